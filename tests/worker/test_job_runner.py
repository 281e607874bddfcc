"""The worker loop with a hand-written fake engine over a real SQLite store and file store."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from kontext_server.domain.editing import EditInput, EditRequest, EditResult, EncodedImage
from kontext_server.domain.errors import EditCancelled
from kontext_server.domain.jobs import JobStatus, NewJob
from kontext_server.files.local import LocalFileStore
from kontext_server.net.fetch import SafeFetcher
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.worker.runner import JobRunner, RunnerLimits

ENDPOINT = "fal-ai/flux-pro/kontext/max"


def png_data_uri(width: int = 32, height: int = 24) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class FakeEngine:
    """Returns solid images; reports ``steps`` steps, sleeping ``step_s`` each."""

    random_weights = True
    default_steps = 4

    def __init__(self, steps: int = 4, step_s: float = 0.0) -> None:
        self.steps, self.step_s = steps, step_s
        self.requests: list[EditRequest] = []
        self.steps_run = 0

    def edit(
        self,
        request: EditRequest,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> EditResult:
        self.requests.append(request)
        for step in range(1, self.steps + 1):
            time.sleep(self.step_s)
            self.steps_run += 1
            if on_step:
                on_step(step, self.steps)
            if should_cancel and should_cancel():
                raise EditCancelled("cancelled")
        images = []
        for i in range(request.num_images):
            buf = io.BytesIO()
            fmt = "PNG" if request.output_format == "png" else "JPEG"
            Image.new("RGB", (64, 48), (i * 40, 0, 0)).save(buf, format=fmt)
            ctype = "image/png" if fmt == "PNG" else "image/jpeg"
            images.append(EncodedImage(buf.getvalue(), 64, 48, ctype))
        return EditResult(
            images, seed=request.seed or 7, timings={"inference": 0.01}, random_weights=True
        )


@pytest.fixture
def store(tmp_path: Path) -> SQLiteJobStore:
    s = SQLiteJobStore(str(tmp_path / "jobs.db"))
    yield s
    s.close()


@pytest.fixture
def files(tmp_path: Path) -> LocalFileStore:
    return LocalFileStore(tmp_path / "files")


def make_runner(
    store: SQLiteJobStore, files: LocalFileStore, engine: FakeEngine, **limits: float
) -> JobRunner:
    fetcher = SafeFetcher(allow_hosts=[], allow_ports=[80, 443], timeout_s=5, max_bytes=1 << 20)
    return JobRunner(
        store,
        files,
        engine,
        fetcher,
        worker_id="w1",
        limits=RunnerLimits(**limits),
        model_name="fake",
    )


def submit(store: SQLiteJobStore, job_id: str = "job-1", **fields: object) -> None:
    fields = {"references": (png_data_uri(),), **fields}
    data = EditInput(prompt="make it blue", **fields)  # type: ignore[arg-type]
    store.submit(NewJob(id=job_id, endpoint=ENDPOINT, input=data))


def test_successful_job_stores_images_and_a_result_in_the_contract_shape(store, files) -> None:
    engine = FakeEngine()
    submit(store, seed=42, num_images=2, output_format="png")
    runner = make_runner(store, files, engine)
    assert runner.run_next() is True
    job = store.get("job-1")
    assert job is not None and job.status is JobStatus.SUCCEEDED
    result = job.result
    assert result is not None
    assert result["seed"] == 42 and result["prompt"] == "make it blue"
    assert result["has_nsfw_concepts"] == [False, False]
    assert len(result["images"]) == 2
    for image in result["images"]:
        assert image["content_type"] == "image/png" and image["url"] is None
        data = files.read(image["file_key"])
        assert data is not None and len(data) == image["file_size"]
        assert Image.open(io.BytesIO(data)).size == (image["width"], image["height"])
    request = engine.requests[0]
    assert request.seed == 42 and request.num_images == 2 and request.images[0].size == (32, 24)
    assert job.progress is not None and (job.progress.step, job.progress.total) == (4, 4)


def test_sync_mode_inlines_data_uris_and_stores_no_file(store, files, tmp_path) -> None:
    submit(store, inline_output=True)
    make_runner(store, files, FakeEngine()).run_next()
    job = store.get("job-1")
    assert job is not None and job.result is not None
    image = job.result["images"][0]
    assert image["file_key"] is None and image["url"].startswith("data:image/jpeg;base64,")
    assert not any(p.is_file() for p in (tmp_path / "files").rglob("*"))


def test_cancel_while_running_stops_within_one_step(store, files) -> None:
    engine = FakeEngine(steps=50, step_s=0.02)
    submit(store)
    runner = make_runner(store, files, engine)
    worker = threading.Thread(target=runner.run_next)
    worker.start()
    while engine.steps_run < 3:
        time.sleep(0.005)
    store.request_cancel("job-1")
    requested_at = engine.steps_run
    worker.join(timeout=10)
    job = store.get("job-1")
    assert job is not None and job.status is JobStatus.CANCELED
    assert job.error_type == "client_cancelled"
    assert engine.steps_run <= requested_at + 1


def test_undecodable_image_fails_the_job_with_a_clear_error(store, files) -> None:
    submit(store, references=("data:image/png;base64," + base64.b64encode(b"not a png").decode(),))
    engine = FakeEngine()
    make_runner(store, files, engine).run_next()
    job = store.get("job-1")
    assert job is not None and job.status is JobStatus.FAILED
    assert job.error_type == "image_load_error" and job.error
    assert engine.requests == []


def test_heartbeat_keeps_the_lease_alive_during_a_long_edit(store, files) -> None:
    engine = FakeEngine(steps=10, step_s=0.1)  # 1 s of "GPU work", lease only 0.3 s
    submit(store)
    runner = make_runner(store, files, engine, lease_s=0.3, heartbeat_s=0.05)
    worker = threading.Thread(target=runner.run_next)
    worker.start()
    requeued = 0
    while worker.is_alive():
        requeued += store.requeue_expired()
        time.sleep(0.02)
    job = store.get("job-1")
    assert requeued == 0
    assert job is not None and job.status is JobStatus.SUCCEEDED and job.attempts == 1


def test_a_worker_that_lost_its_lease_records_nothing(store, files) -> None:
    engine = FakeEngine(steps=10, step_s=0.05)
    submit(store)
    # heartbeats far apart: the lease expires mid-edit and another worker takes the job over
    runner = make_runner(store, files, engine, lease_s=0.1, heartbeat_s=5.0)
    worker = threading.Thread(target=runner.run_next)
    worker.start()
    time.sleep(0.2)
    assert store.requeue_expired() == 1
    second = store.claim("w2", 30.0)
    assert second is not None and second.attempts == 2
    worker.join(timeout=10)
    job = store.get("job-1")
    assert job is not None and job.status is JobStatus.RUNNING and job.lease_owner == "w2"


class _HeldProgressStore(SQLiteJobStore):
    """A store whose progress writes wait until the test lets them go."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.release = threading.Event()
        self.written: list[tuple[int, int]] = []

    def set_progress(self, job_id, worker_id, attempt, progress):  # type: ignore[no-untyped-def]
        self.release.wait(timeout=10)
        self.written.append((progress.step, progress.total))
        return super().set_progress(job_id, worker_id, attempt, progress)


def test_steps_never_wait_for_progress_writes_and_the_last_one_lands(tmp_path, files) -> None:
    held = _HeldProgressStore(str(tmp_path / "held.db"))
    engine = FakeEngine(steps=8)
    submit(held)
    runner = make_runner(held, files, engine, progress_interval_s=0.0)
    worker = threading.Thread(target=runner.run_next)
    worker.start()
    deadline = time.monotonic() + 5
    while engine.steps_run < 8 and time.monotonic() < deadline:
        time.sleep(0.005)
    # every step ran while the first progress write was still held: the loop did not wait
    assert engine.steps_run == 8 and held.written == []
    held.release.set()
    worker.join(timeout=10)
    job = held.get("job-1")
    held.close()
    assert job is not None and job.status is JobStatus.SUCCEEDED
    assert job.progress is not None and (job.progress.step, job.progress.total) == (8, 8)
    assert len(held.written) < 8  # reports made meanwhile were coalesced
