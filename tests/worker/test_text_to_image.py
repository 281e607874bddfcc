"""The engine with no reference image (fal's text-to-image endpoints) and fal [dev]'s
resolution_mode, on the real diffusers code path with the tiny random model (CPU); then the
worker running stored inputs of the new endpoints end to end."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from kontext_server.domain import sizing
from kontext_server.domain.editing import EditRequest, EditResult
from kontext_server.domain.jobs import JobStatus, NewJob
from kontext_server.files.local import LocalFileStore
from kontext_server.http.fal.inputs import stored_input
from kontext_server.http.fal.schemas import DevInput, FalInput, TextToImageInput
from kontext_server.net.fetch import SafeFetcher
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.worker.pipeline import KontextPipeline
from kontext_server.worker.runner import JobRunner

SMALL_AREA_PX = 64 * 64  # the small_engine fixture's area (tests/worker/conftest.py)


def _pixels(data: bytes) -> np.ndarray:  # type: ignore[type-arg]
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _generate(engine: KontextPipeline, **overrides: Any) -> Any:
    """A 2-step PNG text-to-image request, seed 5, with ``overrides``."""
    fields: dict[str, Any] = {
        "prompt": "a red bicycle leaning on a wall",
        "images": [],
        "seed": 5,
        "num_inference_steps": 2,
        "output_format": "png",
    }
    fields.update(overrides)
    return engine.edit(EditRequest(**fields))


def test_no_reference_generates_a_square_of_about_one_megapixel_by_default(
    engine: KontextPipeline,
) -> None:
    image = _generate(engine, num_inference_steps=1).images[0]

    assert (image.width, image.height) == (1024, 1024)
    assert Image.open(io.BytesIO(image.data)).size == (1024, 1024)


@pytest.mark.parametrize("ratio", ["16:9", "9:21", "3:2"])
def test_no_reference_output_follows_the_aspect_ratio(
    small_engine: KontextPipeline, ratio: str
) -> None:
    image = _generate(small_engine, aspect_ratio=ratio).images[0]

    expected = sizing.text_to_image_size(ratio, area_px=SMALL_AREA_PX)
    assert (image.width, image.height) == expected
    assert Image.open(io.BytesIO(image.data)).size == expected
    width, height = sizing.text_to_image_size(ratio)  # the real size: that ratio at ~1 MP
    assert abs(width / height - _ratio(ratio)) < 0.03
    assert 0.9 * sizing.ONE_MEGAPIXEL <= width * height <= sizing.ONE_MEGAPIXEL


def _ratio(text: str) -> float:
    width, height = text.split(":")
    return int(width) / int(height)


def test_text_to_image_is_deterministic_by_seed(small_engine: KontextPipeline) -> None:
    first = _generate(small_engine, num_images=2)
    again = _generate(small_engine, num_images=2)
    other_seed = _generate(small_engine, seed=6)

    assert first.seed == 5
    assert [image.data for image in first.images] == [image.data for image in again.images]
    assert first.images[0].data != first.images[1].data
    # image i uses seed + i, as with references
    assert first.images[1].data == other_seed.images[0].data


def test_text_to_image_equals_stock_diffusers_without_image(
    small_engine: KontextPipeline, tiny_diffusers_pipe: Any
) -> None:
    result = _generate(small_engine, prompt="a lighthouse", seed=11)

    stock = FluxKontextPipeline(**tiny_diffusers_pipe.components)
    stock.set_progress_bar_config(disable=True)
    expected = stock(
        image=None,
        prompt="a lighthouse",
        num_inference_steps=2,
        guidance_scale=3.5,
        height=64,
        width=64,
        max_area=64 * 64,
        generator=torch.Generator().manual_seed(11),
    ).images[0]
    assert np.array_equal(_pixels(result.images[0].data), np.asarray(expected))


def test_text_to_image_reports_every_step(small_engine: KontextPipeline) -> None:
    steps: list[tuple[int, int]] = []

    result = small_engine.edit(
        EditRequest(prompt="x", images=[], seed=1, num_images=2, num_inference_steps=2),
        on_step=lambda step, total: steps.append((step, total)),
    )

    assert result.steps == 4
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_match_input_keeps_the_input_size(engine: KontextPipeline) -> None:
    reference = Image.new("RGB", (100, 70), "green")
    request = EditRequest(
        prompt="x", images=[reference], seed=1, num_inference_steps=1, match_input_size=True
    )

    image = engine.edit(request).images[0]

    assert (image.width, image.height) == (96, 64)  # sides floored to multiples of 16


def test_match_input_scales_large_inputs_down_to_the_cap() -> None:
    width, height = sizing.output_size(4000, 3000, match_input=True)

    assert width * height <= sizing.MATCH_INPUT_MAX_PX
    assert width % 16 == 0 and height % 16 == 0
    assert abs(width / height - 4 / 3) < 0.02


# --- the worker running the new endpoints' stored inputs -----------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteJobStore]:
    job_store = SQLiteJobStore(str(tmp_path / "jobs.db"))
    yield job_store
    job_store.close()


class RecordingEngine:
    """The small tiny engine, keeping every request the worker builds."""

    def __init__(self, engine: KontextPipeline) -> None:
        self.engine = engine
        self.random_weights = engine.random_weights
        self.default_steps = engine.default_steps
        self.requests: list[EditRequest] = []

    def edit(self, request: EditRequest, **callbacks: Any) -> EditResult:
        self.requests.append(request)
        return self.engine.edit(request, **callbacks)


@pytest.fixture
def recording(small_engine: KontextPipeline) -> RecordingEngine:
    return RecordingEngine(small_engine)


@pytest.fixture
def runner(
    store: SQLiteJobStore, tmp_path: Path, recording: RecordingEngine
) -> Iterator[JobRunner]:
    fetcher = SafeFetcher(allow_hosts=[], allow_ports=[80, 443], timeout_s=5, max_bytes=1 << 20)
    job_runner = JobRunner(
        store,
        LocalFileStore(tmp_path / "files"),
        recording,
        fetcher,
        worker_id="w1",
        model_name="tiny",
    )
    yield job_runner
    job_runner.close()


def _png_data_uri(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (20, 120, 200)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _run_job(
    store: SQLiteJobStore,
    runner: JobRunner,
    endpoint: str,
    model: type[FalInput],
    body: dict[str, Any],
) -> tuple[dict[str, Any], list[str]]:
    """Validate ``body`` as the API does, queue it, run it; the result and log messages."""
    job_input = stored_input(model.model_validate(body))
    store.submit(NewJob(id="job-1", endpoint=endpoint, input=job_input))
    assert runner.run_next()
    job = store.get("job-1")
    assert job is not None and job.status is JobStatus.SUCCEEDED, job and job.error
    assert job.result is not None
    return job.result, [event.message for event in store.events("job-1")]


def test_worker_runs_a_text_to_image_request_at_its_aspect_ratio(
    store: SQLiteJobStore, runner: JobRunner
) -> None:
    body = {"prompt": "a red bicycle", "aspect_ratio": "16:9", "seed": 3, "num_images": 2}

    result, messages = _run_job(
        store, runner, "fal-ai/flux-pro/kontext/max/text-to-image", TextToImageInput, body
    )

    expected = sizing.text_to_image_size("16:9", area_px=SMALL_AREA_PX)
    assert [(image["width"], image["height"]) for image in result["images"]] == [expected] * 2
    assert result["seed"] == 3 and result["prompt"] == "a red bicycle"
    assert "text-to-image: no reference image" in messages


@pytest.mark.parametrize(
    ("resolution_mode", "expected"),
    [
        ("match_input", sizing.output_size(48, 32, match_input=True, area_px=SMALL_AREA_PX)),
        ("auto", sizing.output_size(48, 32, area_px=SMALL_AREA_PX)),
        ("4:5", sizing.output_size(48, 32, "4:5", area_px=SMALL_AREA_PX)),
    ],
)
def test_worker_maps_dev_resolution_mode_to_the_output_size(
    store: SQLiteJobStore,
    runner: JobRunner,
    resolution_mode: str,
    expected: tuple[int, int],
) -> None:
    body = {
        "prompt": "make it green",
        "image_url": _png_data_uri(48, 32),
        "resolution_mode": resolution_mode,
        "num_inference_steps": 2,
    }

    result, _ = _run_job(store, runner, "fal-ai/flux-kontext/dev", DevInput, body)

    assert (result["images"][0]["width"], result["images"][0]["height"]) == expected


def test_sizes_of_the_dev_modes_differ_so_the_mapping_test_can_fail() -> None:
    sizes = {
        sizing.output_size(48, 32, match_input=True, area_px=SMALL_AREA_PX),
        sizing.output_size(48, 32, area_px=SMALL_AREA_PX),
        sizing.output_size(48, 32, "4:5", area_px=SMALL_AREA_PX),
    }
    assert len(sizes) == 3


def test_worker_passes_dev_steps_and_guidance_and_logs_an_acceleration_it_cannot_apply(
    store: SQLiteJobStore, runner: JobRunner, recording: RecordingEngine
) -> None:
    body = {
        "prompt": "make it green",
        "image_url": _png_data_uri(64, 64),
        "num_inference_steps": 3,
        "acceleration": "high",
    }

    _, messages = _run_job(store, runner, "fal-ai/flux-kontext/dev", DevInput, body)

    request = recording.requests[0]
    assert request.num_inference_steps == 3 != recording.default_steps
    assert request.guidance_scale == 2.5  # [dev]'s default
    assert request.match_input_size and request.aspect_ratio is None
    assert any(
        m.startswith("acceleration 'high': this engine has no acceleration") for m in messages
    )


def test_worker_says_nothing_about_acceleration_none(
    store: SQLiteJobStore, runner: JobRunner
) -> None:
    body = {"prompt": "make it green", "image_url": _png_data_uri(64, 64), "num_inference_steps": 1}

    _, messages = _run_job(store, runner, "fal-ai/flux-kontext/dev", DevInput, body)

    assert not any("acceleration" in message for message in messages)
