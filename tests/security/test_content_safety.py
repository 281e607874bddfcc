"""Content safety: the safety_tolerance table, the prompt blocklist, a real (tiny) transformers
classifier loaded from a folder the test saved, and the worker applying all of it to inputs
and outputs."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from safety_support import RedIsNSFW, save_tiny_nsfw_classifier

from kontext_server.config import Settings
from kontext_server.domain.editing import EditRequest, EditResult, EncodedImage
from kontext_server.domain.errors import ConfigError
from kontext_server.domain.jobs import Job, JobStatus, NewJob
from kontext_server.files.local import LocalFileStore
from kontext_server.http.fal.inputs import stored_input
from kontext_server.http.fal.schemas import ENDPOINTS
from kontext_server.net.fetch import SafeFetcher
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.worker.runner import JobRunner
from kontext_server.worker.safety_policy import (
    CONTENT_POLICY_ERROR_TYPE,
    DEFAULT_THRESHOLDS,
    ContentPolicyViolation,
    ContentSafety,
    ImageClassifier,
    SafetyPolicy,
    policy_from_settings,
)

ENDPOINT = "fal-ai/flux-pro/kontext/max"
RED, BLUE = (220, 20, 20), (20, 20, 220)


# --- the table -------------------------------------------------------------------------------


def test_level_one_is_strictest_and_level_six_is_only_the_hard_floor() -> None:
    policy = SafetyPolicy()
    thresholds = [policy.threshold(level) for level in range(1, 7)]
    assert thresholds == list(DEFAULT_THRESHOLDS) == sorted(thresholds)
    assert policy.is_flagged(0.30, 1) and not policy.is_flagged(0.30, 2)
    assert not policy.is_flagged(0.94, 6) and policy.is_flagged(0.95, 6)


def test_the_table_is_configurable_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KONTEXT_SAFETY_THRESHOLDS", "0.1, 0.2, 0.3, 0.4, 0.5, 0.99")
    monkeypatch.setenv("KONTEXT_SAFETY_PROMPT_BLOCKLIST", "forbidden thing,nope")
    policy = policy_from_settings(Settings())
    assert policy.threshold(1) == 0.1 and policy.threshold(6) == 0.99
    assert policy.blocked_term("a Forbidden  Thing here", 1) == "forbidden thing"


@pytest.mark.parametrize(
    "thresholds", [(0.1, 0.2), (0.5, 0.4, 0.6, 0.7, 0.8, 0.9), (0.1, 0.2, 0.3, 0.4, 0.5, 1.5)]
)
def test_a_table_that_cannot_work_is_a_config_error(thresholds: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError, match="KONTEXT_SAFETY_THRESHOLDS"):
        SafetyPolicy(thresholds=thresholds)


def test_the_prompt_blocklist_applies_at_the_strict_levels_only() -> None:
    safety = ContentSafety(SafetyPolicy(prompt_blocklist=("gore",)), None)
    with pytest.raises(ContentPolicyViolation, match="blocked term 'gore' at safety_tolerance 2"):
        safety.check_prompt("add some GORE to it", 2)
    safety.check_prompt("add some gore to it", 3)  # levels 3..6: no blocklist
    safety.check_prompt("add a gorilla", 1)  # whole words only


# --- the classifier --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    """Tiny ViT classifiers whose NSFW probability is 0.6 or 0.01 for every image."""
    root = tmp_path_factory.mktemp("classifiers")
    return {p: save_tiny_nsfw_classifier(root / f"p{p}", p) for p in (0.6, 0.01)}


def test_the_classifier_folder_is_loaded_and_scores_by_its_nsfw_labels(
    classifier_dirs: dict[float, Path],
) -> None:
    from kontext_server.worker.safety import TransformersNSFWClassifier

    images = [Image.new("RGB", (50, 80), RED), Image.new("L", (7, 7))]
    for probability, folder in classifier_dirs.items():
        scores = TransformersNSFWClassifier(folder, nsfw_labels=["NSFW"]).nsfw_scores(images)
        assert scores == pytest.approx([probability, probability], abs=1e-4)
    normal = TransformersNSFWClassifier(classifier_dirs[0.6], nsfw_labels=["nsfw", "normal"])
    assert normal.nsfw_scores(images[:1]) == pytest.approx([1.0], abs=1e-4)


def test_a_classifier_folder_that_cannot_work_is_a_config_error(
    tmp_path: Path, classifier_dirs: dict[float, Path]
) -> None:
    from kontext_server.worker.safety import TransformersNSFWClassifier

    with pytest.raises(ConfigError, match="not a transformers model folder"):
        TransformersNSFWClassifier(tmp_path, nsfw_labels=["nsfw"])
    with pytest.raises(ConfigError, match=r"no NSFW label .*normal, nsfw"):
        TransformersNSFWClassifier(classifier_dirs[0.6], nsfw_labels=["porn"])


def test_without_a_classifier_the_worker_says_so_at_start_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from kontext_server.worker.safety import content_safety_from_settings

    with caplog.at_level(logging.WARNING):
        safety = content_safety_from_settings(Settings())
    assert not safety.screens_images
    assert "no image classifier configured (KONTEXT_SAFETY_MODEL is unset)" in caplog.text


def test_a_configured_classifier_is_loaded_from_the_local_path(
    classifier_dirs: dict[float, Path],
) -> None:
    from kontext_server.worker.safety import content_safety_from_settings

    safety = content_safety_from_settings(Settings(safety_model=classifier_dirs[0.6]))
    assert safety.screens_images


# --- the worker ------------------------------------------------------------------------------


class SolidEngine:
    """A fake engine whose outputs are solid ``colour`` images of 40x24."""

    random_weights = False
    default_steps = 1

    def __init__(self, colour: tuple[int, int, int]) -> None:
        self.colour = colour
        self.edits = 0

    def edit(
        self,
        request: EditRequest,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> EditResult:
        self.edits += 1
        fmt = request.output_format
        images = []
        for _ in range(request.num_images):
            buffer = io.BytesIO()
            Image.new("RGB", (40, 24), self.colour).save(buffer, format=fmt.upper())
            images.append(EncodedImage(buffer.getvalue(), 40, 24, f"image/{fmt}"))
        return EditResult(images, seed=1)


def _png_data_uri(colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteJobStore]:
    job_store = SQLiteJobStore(tmp_path / "jobs.db")
    yield job_store
    job_store.close()


@pytest.fixture
def files(tmp_path: Path) -> LocalFileStore:
    return LocalFileStore(tmp_path / "files")


def run_one(
    store: SQLiteJobStore,
    files: LocalFileStore,
    engine: SolidEngine,
    classifier: ImageClassifier | None,
    *,
    policy: SafetyPolicy | None = None,
    **job_input: object,
) -> Job:
    data = {"prompt": "make it nice", "image_url": _png_data_uri(BLUE), **job_input}
    edit = stored_input(ENDPOINTS[ENDPOINT].model_validate(data))  # as the API does
    store.submit(NewJob(id="job-1", endpoint=ENDPOINT, input=edit))
    fetcher = SafeFetcher(allow_hosts=[], allow_ports=[443], timeout_s=1, max_bytes=1 << 20)
    safety = ContentSafety(policy or SafetyPolicy(), classifier)
    runner = JobRunner(store, files, engine, fetcher, worker_id="w", safety=safety)
    try:
        assert runner.run_next()
    finally:
        runner.close()
    job = store.get("job-1")
    assert job is not None
    return job


def test_a_flagged_output_is_replaced_by_a_black_image_of_the_same_size(
    store: SQLiteJobStore, files: LocalFileStore
) -> None:
    job = run_one(store, files, SolidEngine(RED), RedIsNSFW(), output_format="png")

    assert job.status is JobStatus.SUCCEEDED and job.result is not None
    assert job.result["has_nsfw_concepts"] == [True]
    image = job.result["images"][0]
    stored = files.read(image["file_key"])
    assert stored is not None
    decoded = Image.open(io.BytesIO(stored)).convert("RGB")
    assert decoded.size == (40, 24) == (image["width"], image["height"])
    assert decoded.getextrema() == ((0, 0), (0, 0), (0, 0))
    assert image["file_size"] == len(stored)


def test_a_safe_output_is_published_unchanged_and_not_flagged(
    store: SQLiteJobStore, files: LocalFileStore
) -> None:
    job = run_one(store, files, SolidEngine(BLUE), RedIsNSFW(), num_images=2)

    assert job.result is not None and job.result["has_nsfw_concepts"] == [False, False]
    stored = files.read(job.result["images"][0]["file_key"])
    assert stored is not None
    assert Image.open(io.BytesIO(stored)).convert("RGB").getpixel((5, 5)) != (0, 0, 0)


def test_a_flagged_input_ends_the_request_with_content_policy_violation(
    store: SQLiteJobStore, files: LocalFileStore
) -> None:
    engine = SolidEngine(BLUE)
    job = run_one(store, files, engine, RedIsNSFW(), image_url=_png_data_uri(RED))

    assert job.status is JobStatus.FAILED
    assert job.error_type == CONTENT_POLICY_ERROR_TYPE
    assert job.error is not None and "input image 1 was refused by the content policy" in job.error
    assert engine.edits == 0  # nothing was generated from it


def test_a_blocked_prompt_ends_the_request_before_any_image_is_fetched(
    store: SQLiteJobStore, files: LocalFileStore
) -> None:
    engine = SolidEngine(BLUE)
    policy = SafetyPolicy(prompt_blocklist=("forbidden",))
    job = run_one(
        store, files, engine, None, policy=policy,
        prompt="something forbidden", image_url="https://unreachable.invalid/x.png",
        safety_tolerance="1",
    )  # fmt: skip

    assert job.status is JobStatus.FAILED and job.error_type == CONTENT_POLICY_ERROR_TYPE
    assert "blocked term 'forbidden'" in (job.error or "")


def test_the_real_classifier_flags_by_the_requests_safety_tolerance(
    store: SQLiteJobStore, files: LocalFileStore, classifier_dirs: dict[float, Path]
) -> None:
    from kontext_server.worker.safety import TransformersNSFWClassifier

    classifier = TransformersNSFWClassifier(classifier_dirs[0.6], nsfw_labels=["nsfw"])
    strict = run_one(store, files, SolidEngine(BLUE), classifier, safety_tolerance="3")
    assert strict.error_type == CONTENT_POLICY_ERROR_TYPE
    assert "NSFW score 0.60 >= 0.50, the threshold of safety_tolerance 3" in (strict.error or "")


def test_the_real_classifier_lets_a_permissive_request_through(
    store: SQLiteJobStore, files: LocalFileStore, classifier_dirs: dict[float, Path]
) -> None:
    from kontext_server.worker.safety import TransformersNSFWClassifier

    classifier = TransformersNSFWClassifier(classifier_dirs[0.6], nsfw_labels=["nsfw"])
    job = run_one(store, files, SolidEngine(BLUE), classifier, safety_tolerance=4)

    assert job.status is JobStatus.SUCCEEDED and job.result is not None
    assert job.result["has_nsfw_concepts"] == [False]


def test_without_a_classifier_nothing_is_flagged(
    store: SQLiteJobStore, files: LocalFileStore
) -> None:
    job = run_one(store, files, SolidEngine(RED), None, image_url=_png_data_uri(RED))

    assert job.status is JobStatus.SUCCEEDED and job.result is not None
    assert job.result["has_nsfw_concepts"] == [False]
