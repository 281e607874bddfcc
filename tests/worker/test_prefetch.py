"""Input prefetch: the next queued job's images are fetched and decoded during the current
edit, over real HTTP on 127.0.0.1, a real SQLite store and a real file store."""

from __future__ import annotations

import http.server
import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from kontext_server.domain.editing import EditInput, EditRequest, EditResult, EncodedImage
from kontext_server.domain.jobs import Job, JobStatus, NewJob
from kontext_server.files.local import LocalFileStore
from kontext_server.net.fetch import SafeFetcher
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.worker.runner import JobRunner, RunnerLimits
from kontext_server.worker.safety_policy import ContentSafety, SafetyPolicy

ENDPOINT = "fal-ai/flux-pro/kontext/max"
COLORS = {"/a.png": (200, 0, 0), "/b.png": (0, 200, 0), "/c.png": (0, 0, 200)}
WAIT_S = 10.0


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# --- a counting loopback image server ------------------------------------------------------


@dataclass
class ImageServer:
    """Serves ``COLORS`` as PNGs on 127.0.0.1 and counts requests per path. ``delay_s``
    holds a path's answer; ``fail`` answers a path with that many 500s first (-1: always
    404); ``on_request`` runs before answering."""

    port: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    delay_s: dict[str, float] = field(default_factory=dict)
    fail: dict[str, int] = field(default_factory=dict)
    on_request: Callable[[str], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, path: str) -> int:
        with self.lock:
            return self.counts.get(path, 0)

    def wait_for(self, path: str, timeout_s: float = WAIT_S) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.count(path) == 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True


@pytest.fixture
def server() -> Iterator[ImageServer]:
    state = ImageServer()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with state.lock:
                state.counts[self.path] = state.counts.get(self.path, 0) + 1
                failures_left = state.fail.get(self.path, 0)
                if failures_left > 0:
                    state.fail[self.path] = failures_left - 1
            if state.on_request:
                state.on_request(self.path)
            time.sleep(state.delay_s.get(self.path, 0.0))
            if failures_left or self.path not in COLORS:
                self.send_response(404 if failures_left < 0 else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = png(COLORS[self.path])
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


# --- an engine that echoes its first reference ---------------------------------------------


class EchoEngine:
    """Returns the first reference image as a PNG (so the output shows which input it got);
    ``during[i]`` runs inside the i-th edit, ``edit_s`` is the edit's time."""

    random_weights = False
    default_steps = 1

    def __init__(self, edit_s: float = 0.0) -> None:
        self.edit_s = edit_s
        self.requests: list[EditRequest] = []
        self.during: dict[int, Callable[[], object]] = {}
        self.failures: list[BaseException] = []

    def edit(
        self,
        request: EditRequest,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> EditResult:
        index = len(self.requests)
        self.requests.append(request)
        hook = self.during.get(index)
        if hook is not None:
            try:
                hook()
            except BaseException as exc:  # an assert inside the runner: report it to the test
                self.failures.append(exc)
        time.sleep(self.edit_s)
        if on_step:
            on_step(1, 1)
        image = request.images[0] if request.images else Image.new("RGB", (8, 8))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        return EditResult(
            [EncodedImage(data, image.width, image.height, "image/png")],
            seed=1,
            timings={"inference": self.edit_s},
            random_weights=False,
        )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteJobStore]:
    s = SQLiteJobStore(str(tmp_path / "jobs.db"))
    yield s
    s.close()


@pytest.fixture
def files(tmp_path: Path) -> LocalFileStore:
    return LocalFileStore(tmp_path / "files")


@pytest.fixture
def runners() -> Iterator[list[JobRunner]]:
    made: list[JobRunner] = []
    yield made
    for runner in made:
        runner.close()


def make_runner(
    runners: list[JobRunner],
    store: SQLiteJobStore,
    files: LocalFileStore,
    engine: EchoEngine,
    prefetch_jobs: int = 1,
    safety: ContentSafety | None = None,
) -> JobRunner:
    fetcher = SafeFetcher(
        allow_hosts=["127.0.0.1"], allow_ports=[80, 443], timeout_s=5, max_bytes=1 << 20
    )
    runner = JobRunner(
        store,
        files,
        engine,
        fetcher,
        worker_id="w1",
        limits=RunnerLimits(prefetch_jobs=prefetch_jobs),
        model_name="echo",
        safety=safety,
    )
    runners.append(runner)
    return runner


def submit(store: SQLiteJobStore, job_id: str, url: str, prompt: str = "make it blue") -> None:
    data = EditInput(prompt=prompt, references=(url,), output_format="png")
    store.submit(NewJob(id=job_id, endpoint=ENDPOINT, input=data))


def finished(store: SQLiteJobStore, job_id: str) -> Job:
    job = store.get(job_id)
    assert job is not None
    return job


def output_bytes(files: LocalFileStore, job: Job) -> bytes:
    assert job.status is JobStatus.SUCCEEDED and job.result is not None
    data = files.read(job.result["images"][0]["file_key"])
    assert data is not None
    return data


def queued_now(store: SQLiteJobStore, job_id: str) -> bool:
    return finished(store, job_id).status is JobStatus.QUEUED


# --- the tests ---------------------------------------------------------------------------


def test_the_next_jobs_image_is_fetched_during_the_edit_once_with_the_same_result(
    server: ImageServer, store: SQLiteJobStore, files: LocalFileStore, runners: list[JobRunner]
) -> None:
    submit(store, "a", server.url("/a.png"))
    submit(store, "b", server.url("/b.png"))
    engine = EchoEngine()
    seen: dict[str, object] = {}

    def while_a_runs() -> None:  # before b's claim: the runner is inside a's edit
        seen["fetched"] = server.wait_for("/b.png")
        seen["b queued"] = queued_now(store, "b")

    engine.during[0] = while_a_runs
    runner = make_runner(runners, store, files, engine)
    assert runner.run_next() and runner.run_next()
    assert not engine.failures
    assert seen == {"fetched": True, "b queued": True}
    assert server.counts == {"/a.png": 1, "/b.png": 1}
    assert engine.requests[1].images[0].getpixel((0, 0)) == COLORS["/b.png"]
    prefetched_output = output_bytes(files, finished(store, "b"))

    # the same job without prefetch: byte-identical output
    submit(store, "b-again", server.url("/b.png"))
    make_runner(runners, store, files, EchoEngine(), prefetch_jobs=0).run_next()
    assert output_bytes(files, finished(store, "b-again")) == prefetched_output
    assert server.count("/b.png") == 2


def test_a_claim_while_the_prefetch_is_in_flight_waits_for_it(
    server: ImageServer, store: SQLiteJobStore, files: LocalFileStore, runners: list[JobRunner]
) -> None:
    server.delay_s["/b.png"] = 0.4  # a's edit ends while b's image is still on its way
    submit(store, "a", server.url("/a.png"))
    submit(store, "b", server.url("/b.png"))
    engine = EchoEngine()
    engine.during[0] = lambda: server.wait_for("/b.png")
    runner = make_runner(runners, store, files, engine)
    assert runner.run_next() and runner.run_next()
    assert not engine.failures
    assert server.count("/b.png") == 1
    assert finished(store, "b").status is JobStatus.SUCCEEDED
    assert engine.requests[1].images[0].getpixel((0, 0)) == COLORS["/b.png"]


def test_a_job_another_worker_took_does_not_leak_into_the_next(
    server: ImageServer, store: SQLiteJobStore, files: LocalFileStore, runners: list[JobRunner]
) -> None:
    for job_id, path in (("a", "/a.png"), ("b", "/b.png"), ("c", "/c.png")):
        submit(store, job_id, server.url(path))
    engine = EchoEngine()
    runner = make_runner(runners, store, files, engine)
    engine.during[0] = lambda: server.wait_for("/b.png")
    assert runner.run_next()
    assert server.count("/b.png") == 1 and server.count("/c.png") == 0  # one job ahead
    taken = store.claim("w2", 30.0)  # another worker takes b
    assert taken is not None and taken.id == "b"
    held: list[list[str]] = []
    engine.during[1] = lambda: held.append(runner.engine._prefetch.job_ids())
    assert runner.run_next()  # c
    assert not engine.failures
    assert engine.requests[1].images[0].getpixel((0, 0)) == COLORS["/c.png"]
    assert "b" not in held[0]
    assert server.counts == {"/a.png": 1, "/b.png": 1, "/c.png": 1}
    assert runner.engine._prefetch.job_ids() == []
    assert output_bytes(files, finished(store, "c")) != b""


def test_a_canceled_jobs_prefetch_is_dropped(
    server: ImageServer, store: SQLiteJobStore, files: LocalFileStore, runners: list[JobRunner]
) -> None:
    submit(store, "a", server.url("/a.png"))
    submit(store, "b", server.url("/b.png"))
    engine = EchoEngine()
    engine.during[0] = lambda: server.wait_for("/b.png")
    runner = make_runner(runners, store, files, engine)
    assert runner.run_next()
    assert runner.engine._prefetch.job_ids() == ["b"]
    store.request_cancel("b")
    assert runner.run_next() is False
    assert runner.engine._prefetch.job_ids() == []
    assert finished(store, "b").status is JobStatus.CANCELED


def test_prefetch_off_fetches_only_at_claim(
    server: ImageServer, store: SQLiteJobStore, files: LocalFileStore, runners: list[JobRunner]
) -> None:
    submit(store, "a", server.url("/a.png"))
    submit(store, "b", server.url("/b.png"))
    engine = EchoEngine()
    seen: list[bool] = []
    engine.during[0] = lambda: seen.append(server.wait_for("/b.png", timeout_s=0.3))
    runner = make_runner(runners, store, files, engine, prefetch_jobs=0)
    assert runner.run_next()
    assert seen == [False] and server.count("/b.png") == 0
    assert runner.run_next()
    assert server.counts == {"/a.png": 1, "/b.png": 1}
    assert finished(store, "b").status is JobStatus.SUCCEEDED


def test_a_broken_url_fails_its_job_as_without_prefetch(
    server: ImageServer, store: SQLiteJobStore, files: LocalFileStore, runners: list[JobRunner]
) -> None:
    server.fail["/b.png"] = -1  # always 404
    outcomes = {}
    for prefetch_jobs in (1, 0):
        a, b = f"a{prefetch_jobs}", f"b{prefetch_jobs}"
        submit(store, a, server.url("/a.png"))
        submit(store, b, server.url("/b.png"))
        engine = EchoEngine()
        engine.during[0] = lambda: server.wait_for("/b.png", timeout_s=0.3)
        runner = make_runner(runners, store, files, engine, prefetch_jobs)
        assert runner.run_next() and runner.run_next()
        assert finished(store, a).status is JobStatus.SUCCEEDED
        job = finished(store, b)
        outcomes[prefetch_jobs] = (job.status, job.error_type, job.error)
        assert len(engine.requests) == 1  # b never reached the engine
    assert outcomes[1] == outcomes[0]
    assert outcomes[1][0] is JobStatus.FAILED and outcomes[1][1] == "file_download_error"
    assert server.count("/b.png") == 3  # prefetch + claim, then the claim without prefetch


def test_a_failed_prefetch_is_fetched_again_at_claim(
    server: ImageServer, store: SQLiteJobStore, files: LocalFileStore, runners: list[JobRunner]
) -> None:
    server.fail["/b.png"] = 1  # the prefetch gets a 500, the claim's fetch the image
    submit(store, "a", server.url("/a.png"))
    submit(store, "b", server.url("/b.png"))
    engine = EchoEngine()
    engine.during[0] = lambda: server.wait_for("/b.png")
    runner = make_runner(runners, store, files, engine)
    assert runner.run_next() and runner.run_next()
    assert server.count("/b.png") == 2
    assert finished(store, "b").status is JobStatus.SUCCEEDED
    assert [e.level for e in store.events("b") if e.level == "ERROR"] == []


def test_prompt_checks_still_run_on_a_prefetched_job(
    server: ImageServer, store: SQLiteJobStore, files: LocalFileStore, runners: list[JobRunner]
) -> None:
    submit(store, "a", server.url("/a.png"))
    submit(store, "b", server.url("/b.png"), prompt="draw a forbidden thing")
    engine = EchoEngine()
    engine.during[0] = lambda: server.wait_for("/b.png")
    safety = ContentSafety(SafetyPolicy(prompt_blocklist=("forbidden",)), None)
    runner = make_runner(runners, store, files, engine, safety=safety)
    assert runner.run_next() and runner.run_next()
    job = finished(store, "b")
    assert job.status is JobStatus.FAILED and job.error and "forbidden" in job.error
    assert len(engine.requests) == 1 and runner.engine._prefetch.job_ids() == []


def test_no_prefetch_once_the_drain_began(
    server: ImageServer, store: SQLiteJobStore, files: LocalFileStore, runners: list[JobRunner]
) -> None:
    submit(store, "a", server.url("/a.png"))
    submit(store, "b", server.url("/b.png"))
    engine = EchoEngine(edit_s=0.3)
    runner = make_runner(runners, store, files, engine)
    server.on_request = lambda path: runner.drain(60.0) if path == "/a.png" else None
    assert runner.run_next()
    assert finished(store, "a").status is JobStatus.SUCCEEDED  # finished within the drain
    time.sleep(0.1)
    assert server.count("/b.png") == 0 and runner.engine._prefetch.job_ids() == []
    assert queued_now(store, "b")


def test_the_setting_reaches_the_runner(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from kontext_server.config import Settings
    from kontext_server.worker.main import runner_limits

    assert runner_limits(Settings(data_dir=tmp_path)).prefetch_jobs == 1
    assert runner_limits(Settings(data_dir=tmp_path, prefetch_jobs=0)).prefetch_jobs == 0
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, prefetch_jobs=-1)


def test_the_prefetch_benchmark_runs_and_measures_a_saving() -> None:
    import importlib.util

    path = Path(__file__).parents[2] / "benchmarks" / "prefetch.py"
    spec = importlib.util.spec_from_file_location("prefetch_benchmark", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(jobs=3, edit_ms=150.0, latency_ms=100.0, size=64)
    assert len(result["per_job_ms"]["off"]) == len(result["per_job_ms"]["on"]) == 3
    # off: latency + edit per job; on: the fetch hides behind the previous edit
    assert result["median_ms_jobs_2_to_n"]["off"] >= 250.0
    assert result["saving_ms_per_job"] > 50.0
    pooled = bench.run_workers(jobs=4, edit_ms=50.0, latency_ms=20.0, size=64, workers=2)
    assert pooled["off"]["fetches_per_job"] == 1.0  # each job fetched by its own claim only
    assert pooled["on"]["fetches_per_job"] >= 1.0
