"""The execution timeout and the graceful drain of a worker.

In-process tests drive ``JobRunner`` with fixture engines (``fixtures/``) and an exit recorder
in place of ``os._exit``; process tests run ``fixtures/worker.py`` (the production loop around
a fixture engine) as a real process and check its exit code and what it left in the store.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image

from kontext_server.cli.supervisor import WorkerSpec, WorkerSupervisor
from kontext_server.domain.editing import EditInput
from kontext_server.domain.jobs import Job, JobStatus, NewJob
from kontext_server.files.local import LocalFileStore
from kontext_server.net.fetch import SafeFetcher
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.worker.exit_codes import EXIT_DRAINED, EXIT_EXECUTION_TIMEOUT
from kontext_server.worker.runner import JobRunner, RunnerLimits

ENDPOINT = "fal-ai/flux-pro/kontext/max"
FIXTURES = Path(__file__).parent / "fixtures"


def fixture_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"worker_fixture_{name}", FIXTURES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hang = fixture_module("hang")
slow = fixture_module("slow")


def png_data_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def submit(store: SQLiteJobStore, job_id: str = "job-1", max_attempts: int = 3) -> None:
    data = EditInput(prompt="make it blue", references=(png_data_uri(),))
    store.submit(NewJob(id=job_id, endpoint=ENDPOINT, input=data, max_attempts=max_attempts))


def stored(store: SQLiteJobStore, job_id: str = "job-1") -> Job:
    job = store.get(job_id)
    assert job is not None
    return job


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.01)


def has_started_stepping(store: SQLiteJobStore, job_id: str = "job-1") -> bool:
    job = stored(store, job_id)
    return job.status is JobStatus.RUNNING and job.progress is not None


class ExitRecorder:
    """Stands in for ``os._exit``: records the code and lets a hung engine go, so that the
    test process survives what would end a worker process."""

    def __init__(self, release: threading.Event | None = None) -> None:
        self.codes: list[int] = []
        self._release = release

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        if self._release is not None:
            self._release.set()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteJobStore]:
    job_store = SQLiteJobStore(tmp_path / "jobs.db")
    yield job_store
    job_store.close()


@pytest.fixture
def files(tmp_path: Path) -> LocalFileStore:
    return LocalFileStore(tmp_path / "files")


def make_runner(
    store: SQLiteJobStore,
    files: LocalFileStore,
    engine: Any,
    exits: ExitRecorder | None = None,
    worker_id: str = "w1",
    **limits: Any,
) -> JobRunner:
    fetcher = SafeFetcher(allow_hosts=[], allow_ports=[443], timeout_s=5, max_bytes=1 << 20)
    return JobRunner(
        store,
        files,
        engine,
        fetcher,
        worker_id=worker_id,
        limits=RunnerLimits(**{"heartbeat_s": 0.05, **limits}),
        exit_process=exits or ExitRecorder(),
    )


# --- execution timeout, in process ---------------------------------------------------------


def test_a_run_past_the_job_timeout_fails_the_job_and_ends_the_process(
    store: SQLiteJobStore, files: LocalFileStore
) -> None:
    engine = hang.Engine(hang_s=10)
    exits = ExitRecorder(release=engine.released)
    runner = make_runner(store, files, engine, exits, job_timeout_s=0.3)
    submit(store)

    started = time.monotonic()
    assert runner.run_next()

    assert exits.codes == [EXIT_EXECUTION_TIMEOUT]
    assert 0.3 <= time.monotonic() - started < 3
    job = stored(store)
    assert job.status is JobStatus.FAILED
    assert job.error_type == "execution_timeout"
    assert job.error == "the edit ran longer than 0.3 s; its worker was replaced"
    assert job.result is None  # the engine's late return was not published over the failure


def test_a_job_that_ends_in_time_is_never_timed_out(
    store: SQLiteJobStore, files: LocalFileStore
) -> None:
    exits = ExitRecorder()
    runner = make_runner(store, files, slow.Engine(steps=3, step_s=0.02), exits, job_timeout_s=0.5)
    submit(store)

    assert runner.run_next()
    time.sleep(0.6)

    assert exits.codes == []
    assert stored(store).status is JobStatus.SUCCEEDED


def test_a_stuck_worker_whose_job_was_taken_over_is_ended_without_touching_the_new_attempt(
    store: SQLiteJobStore, files: LocalFileStore
) -> None:
    engine = hang.Engine(hang_s=10)
    exits = ExitRecorder(release=engine.released)
    # heartbeats too rare to keep a 0.1 s lease: another worker takes the job over
    runner = make_runner(
        store, files, engine, exits, lease_s=0.1, heartbeat_s=30, job_timeout_s=0.6
    )
    submit(store)
    stuck = threading.Thread(target=runner.run_next)
    stuck.start()
    assert engine.entered.wait(5)
    time.sleep(0.15)
    assert store.requeue_expired() == 1
    taken_over = store.claim("w2", lease_s=30)
    assert taken_over is not None

    stuck.join(5)

    assert exits.codes == [EXIT_EXECUTION_TIMEOUT]
    job = stored(store)
    assert (job.status, job.lease_owner, job.attempts) == (JobStatus.RUNNING, "w2", 2)


# --- drain, in process ------------------------------------------------------------------------


def test_drain_lets_the_job_in_hand_finish_and_claims_nothing_more(
    store: SQLiteJobStore, files: LocalFileStore
) -> None:
    runner = make_runner(store, files, slow.Engine(steps=10, step_s=0.03))
    submit(store, "job-1")
    submit(store, "job-2")
    loop = threading.Thread(target=runner.run_forever)
    loop.start()
    wait_until(lambda: has_started_stepping(store), what="job-1 to run")

    runner.drain(10.0)
    loop.join(5)

    assert not loop.is_alive()
    assert stored(store, "job-1").status is JobStatus.SUCCEEDED
    second = stored(store, "job-2")
    assert (second.status, second.attempts) == (JobStatus.QUEUED, 0)


def test_drain_time_up_hands_the_job_back_at_its_next_step(
    store: SQLiteJobStore, files: LocalFileStore
) -> None:
    engine = slow.Engine(steps=500, step_s=0.02)
    runner = make_runner(store, files, engine)
    submit(store)
    loop = threading.Thread(target=runner.run_forever)
    loop.start()
    wait_until(lambda: has_started_stepping(store), what="the job to run")

    runner.drain(0.1)
    loop.join(5)

    assert not loop.is_alive()
    assert engine.steps_run < 100
    job = stored(store)
    assert (job.status, job.attempts, job.lease_owner) == (JobStatus.QUEUED, 0, None)
    assert store.queue_position(job.id) == 0
    assert any("handed back" in event.message for event in store.events(job.id))


def test_a_cancel_during_a_drain_still_cancels(
    store: SQLiteJobStore, files: LocalFileStore
) -> None:
    runner = make_runner(store, files, slow.Engine(steps=500, step_s=0.02))
    submit(store)
    loop = threading.Thread(target=runner.run_forever)
    loop.start()
    wait_until(lambda: has_started_stepping(store), what="the job to run")

    store.request_cancel("job-1")
    runner.drain(0.0)
    loop.join(5)

    job = stored(store)
    assert (job.status, job.error_type) == (JobStatus.CANCELED, "client_cancelled")


def test_a_job_claimed_as_the_drain_begins_goes_straight_back(
    store: SQLiteJobStore, files: LocalFileStore
) -> None:
    engine = slow.Engine(steps=1)
    runner = make_runner(store, files, engine)
    submit(store)

    runner.drain(60.0)
    runner.run_next()

    assert engine.steps_run == 0
    job = stored(store)
    assert (job.status, job.attempts) == (JobStatus.QUEUED, 0)


# --- real worker processes --------------------------------------------------------------------


class WorkerProcess:
    """``fixtures/worker.py`` over the test's store; its log is kept for failure messages."""

    def __init__(self, tmp_path: Path, engine: str, *options: str) -> None:
        self._log_path = tmp_path / f"worker-{engine}.log"
        argv = [sys.executable, str(FIXTURES / "worker.py"), engine]
        argv += [str(tmp_path / "jobs.db"), str(tmp_path / "files"), *options]
        with self._log_path.open("wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"the worker did not exit in {timeout_s} s:\n{self.log()}"
            ) from None

    def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
        """Wait for ``condition`` while the process lives (its log when it died instead)."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.process.poll() is None, f"the worker died:\n{self.log()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.log()}"
            time.sleep(0.01)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(engine: str, *options: str) -> WorkerProcess:
        worker = WorkerProcess(tmp_path, engine, *options)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


def test_a_worker_process_stuck_past_the_job_timeout_exits_and_its_job_fails(
    store: SQLiteJobStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    submit(store)
    worker = start_worker("hang", "--job-timeout-s", "1")

    code = worker.wait(timeout_s=30)

    assert code == EXIT_EXECUTION_TIMEOUT, worker.log()
    job = stored(store)
    assert (job.status, job.error_type) == (JobStatus.FAILED, "execution_timeout")
    assert job.error == "the edit ran longer than 1 s; its worker was replaced"


def test_sigterm_lets_the_job_in_hand_finish_then_the_worker_exits_0(
    store: SQLiteJobStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    submit(store)
    submit(store, "job-2")
    worker = start_worker("slow", "--steps", "20", "--step-s", "0.05", "--drain-timeout-s", "30")
    worker.wait_for(lambda: has_started_stepping(store), "the job to run")

    worker.process.send_signal(signal.SIGTERM)
    code = worker.wait(timeout_s=30)

    assert code == EXIT_DRAINED, worker.log()
    job = stored(store)
    assert job.status is JobStatus.SUCCEEDED, worker.log()
    assert job.result is not None and len(job.result["images"]) == 1
    assert stored(store, "job-2").status is JobStatus.QUEUED


def test_sigterm_past_the_drain_time_hands_the_job_back_and_the_worker_exits_0(
    store: SQLiteJobStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    submit(store)
    worker = start_worker("slow", "--steps", "1000", "--step-s", "0.05", "--drain-timeout-s", "0.2")
    worker.wait_for(lambda: has_started_stepping(store), "the job to run")

    signalled = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    code = worker.wait(timeout_s=30)

    assert code == EXIT_DRAINED, worker.log()
    assert time.monotonic() - signalled < 5
    job = stored(store)
    assert (job.status, job.attempts, job.lease_owner) == (JobStatus.QUEUED, 0, None)
    assert job.error is None


def test_a_worker_killed_mid_edit_leaves_its_job_to_the_lease(
    store: SQLiteJobStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    submit(store, max_attempts=1)
    worker = start_worker("kill_self", "--lease-s", "0.4")

    code = worker.wait(timeout_s=30)

    assert code == -signal.SIGKILL, worker.log()
    wait_until(lambda: store.requeue_expired() > 0, timeout_s=5, what="the lease to expire")
    job = stored(store)
    assert (job.status, job.error_type) == (JobStatus.FAILED, "runner_disconnected")


# --- the supervisor -----------------------------------------------------------------------------


def count_starts_in(seconds: float, exit_code: int, tmp_path: Path) -> int:
    starts = tmp_path / f"starts-{exit_code}"
    script = f"open({str(starts)!r}, 'a').write('x'); raise SystemExit({exit_code})"
    supervisor = WorkerSupervisor([WorkerSpec([sys.executable, "-c", script])], poll_s=0.02)
    supervisor.start()
    time.sleep(seconds)
    supervisor.stop(timeout_s=5)
    return len(starts.read_text())


def test_the_supervisor_replaces_a_timed_out_worker_at_once_but_backs_off_after_crashes(
    tmp_path: Path,
) -> None:
    # crashes back off 0.5 s, 1 s, 2 s: at most 3 starts in 2 s; timeouts restart at once
    assert count_starts_in(2.0, 1, tmp_path) <= 3
    assert count_starts_in(2.0, EXIT_EXECUTION_TIMEOUT, tmp_path) >= 5
