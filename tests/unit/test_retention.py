"""``CleanupLoop``: expired jobs leave the store, their files leave the file store."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
from fastapi.testclient import TestClient

from kontext_server.config import Settings
from kontext_server.core.retention import CleanupLoop
from kontext_server.domain.editing import EditInput
from kontext_server.domain.jobs import JobStatus, NewJob, PurgedJob
from kontext_server.files import open_file_store
from kontext_server.files.base import FileStore, StoredFile
from kontext_server.files.local import LocalFileStore
from kontext_server.http.app import create_app
from kontext_server.store.base import JobStore
from kontext_server.store.sqlite import SQLiteJobStore
from s3_fixtures import S3Server

DAY_S = 24 * 3600.0
ENDPOINT = "fal-ai/flux-pro/kontext/max"


# --- fakes ----------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class PurgeOnlyStore:
    """Hands out prepared batches of purged jobs; may fail a number of times first."""

    def __init__(self, batches: list[list[PurgedJob]], failures: int = 0) -> None:
        self.batches = batches
        self.failures = failures
        self.limits: list[int] = []
        self.called = threading.Event()

    def purge_expired(self, limit: int = 500) -> list[PurgedJob]:
        self.limits.append(limit)
        self.called.set()
        if self.failures:
            self.failures -= 1
            raise RuntimeError("database is locked")
        return self.batches.pop(0) if self.batches else []


class RecordingFiles:
    """A file store that records deletions and refuses the keys in ``broken``."""

    def __init__(self, broken: frozenset[str] = frozenset()) -> None:
        self.deleted: list[str] = []
        self.broken = broken

    def put(self, key: str, data: bytes, content_type: str) -> StoredFile:
        raise NotImplementedError

    def url(self, key: str, base_url: str) -> str:
        raise NotImplementedError

    def read(self, key: str) -> bytes | None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        if key in self.broken:
            raise OSError(f"S3 delete of {key} failed")
        self.deleted.append(key)


def loop_over(
    store: PurgeOnlyStore, files: FileStore, *, interval_s: float, batch: int = 500
) -> CleanupLoop:
    # The loop calls nothing but purge_expired; the fake implements nothing else.
    return CleanupLoop(cast(JobStore, store), files, interval_s=interval_s, batch=batch)


def purged(job_id: str, *keys: str) -> PurgedJob:
    return PurgedJob(id=job_id, file_keys=list(keys))


# --- the loop -------------------------------------------------------------------------------------
def test_one_pass_purges_batches_until_one_is_not_full_and_deletes_their_files() -> None:
    store = PurgeOnlyStore(
        [[purged("a", "ka"), purged("b")], [purged("c", "kc1", "kc2"), purged("d")], [purged("e")]]
    )
    files = RecordingFiles()
    loop = loop_over(store, files, interval_s=60, batch=2)
    assert loop.run_once() == 5
    assert store.limits == [2, 2, 2]
    assert files.deleted == ["ka", "kc1", "kc2"]


def test_a_file_that_cannot_be_deleted_does_not_keep_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = PurgeOnlyStore([[purged("a", "k1", "k2", "k3")]])
    files = RecordingFiles(broken=frozenset({"k2"}))
    loop = loop_over(store, files, interval_s=60)
    with caplog.at_level(logging.ERROR, logger="kontext_server.core.periodic"):
        assert loop.run_once() == 1
    assert files.deleted == ["k1", "k3"]
    assert "cannot delete file k2 of job a" in caplog.text


def test_the_thread_survives_store_errors_and_tries_again_next_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = PurgeOnlyStore([[purged("a", "ka")]], failures=2)
    files = RecordingFiles()
    loop = loop_over(store, files, interval_s=0.01)
    with caplog.at_level(logging.ERROR, logger="kontext_server.core.periodic"):
        loop.start()
        try:
            wait_until(lambda: files.deleted == ["ka"])
        finally:
            loop.stop()
    assert caplog.text.count("retention-cleanup failed") == 2


def test_stop_ends_the_thread_promptly_even_with_a_long_interval() -> None:
    store = PurgeOnlyStore([])
    loop = loop_over(store, RecordingFiles(), interval_s=3600)
    loop.start()
    assert store.called.wait(5), "the first pass runs at start"
    started = time.monotonic()
    loop.stop()
    assert time.monotonic() - started < 1.0
    assert not any(t.name == "retention-cleanup" for t in threading.enumerate())


@pytest.mark.parametrize(("interval_s", "batch"), [(0, 10), (1, 0)])
def test_nonsense_interval_or_batch_is_refused(interval_s: float, batch: int) -> None:
    with pytest.raises(ValueError, match="interval_s must be > 0 and batch >= 1"):
        loop_over(PurgeOnlyStore([]), RecordingFiles(), interval_s=interval_s, batch=batch)


# --- a real SQLite store, a fake clock, real file stores -------------------------------------
@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[SQLiteJobStore]:
    s = SQLiteJobStore(tmp_path / "jobs.db", clock=clock, default_retention_s=30 * DAY_S)
    yield s
    s.close()


def finish_with_file(
    store: SQLiteJobStore, files: FileStore, job_id: str, retention_s: float | None = None
) -> str:
    """Submit, claim and succeed ``job_id`` with one stored output; returns its file key."""
    store.submit(
        NewJob(id=job_id, endpoint=ENDPOINT, input=EditInput(prompt="p"), retention_s=retention_s)
    )
    job = store.claim("w1", lease_s=60)
    assert job is not None and job.id == job_id
    key = f"Key{job_id}AbCdEfGhIjKlMnOp/1-0.png"
    files.put(key, b"png bytes", "image/png")
    result = {"images": [{"file_key": key, "width": 1, "height": 1}], "seed": 1}
    assert store.finish(job_id, "w1", job.attempts, JobStatus.SUCCEEDED, result=result)
    return key


def test_expired_jobs_and_their_local_files_go_while_recent_ones_stay(
    store: SQLiteJobStore, clock: FakeClock, tmp_path: Path
) -> None:
    files = LocalFileStore(tmp_path / "files")
    old_key = finish_with_file(store, files, "old")
    clock.now += 20 * DAY_S
    new_key = finish_with_file(store, files, "new")
    store.add_event("old", "an event that goes with its job")
    clock.now += 10 * DAY_S + 1  # "old" finished 30 days + 1 s ago, "new" 10 days + 1 s ago

    assert CleanupLoop(store, files, interval_s=60).run_once() == 1

    assert store.get("old") is None and store.events("old") == []
    assert files.read(old_key) is None
    assert not (tmp_path / "files" / old_key).parent.exists()
    assert store.get("new") is not None and files.read(new_key) == b"png bytes"


def test_a_job_with_its_own_short_retention_goes_before_the_default(
    store: SQLiteJobStore, clock: FakeClock, tmp_path: Path
) -> None:
    files = LocalFileStore(tmp_path / "files")
    short_key = finish_with_file(store, files, "short", retention_s=3600)
    default_key = finish_with_file(store, files, "default")
    loop = CleanupLoop(store, files, interval_s=60)

    clock.now += 3599
    assert loop.run_once() == 0 and files.read(short_key) is not None
    clock.now += 2
    assert loop.run_once() == 1
    assert store.get("short") is None and files.read(short_key) is None
    assert store.get("default") is not None and files.read(default_key) is not None


def test_expired_jobs_files_are_deleted_from_s3(
    store: SQLiteJobStore,
    clock: FakeClock,
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    files = open_file_store(f"s3://{s3_bucket}/out", s3_server.settings(tmp_path))
    old_key = finish_with_file(store, files, "old")
    clock.now += 29 * DAY_S
    new_key = finish_with_file(store, files, "new")
    clock.now += 1 * DAY_S + 1

    assert CleanupLoop(store, files, interval_s=60).run_once() == 1

    assert store.get("old") is None and files.read(old_key) is None
    assert files.read(new_key) == b"png bytes"
    listing = s3_server.client().list_objects_v2(Bucket=s3_bucket)
    assert [item["Key"] for item in listing["Contents"]] == [f"out/{new_key}"]


def test_the_api_app_runs_the_cleanup_while_it_is_up(
    store: SQLiteJobStore, clock: FakeClock, tmp_path: Path
) -> None:
    files = LocalFileStore(tmp_path / "files")
    key = finish_with_file(store, files, "old")
    clock.now += 31 * DAY_S
    settings = Settings(data_dir=tmp_path, cleanup_interval_s=0.05)
    with TestClient(create_app(settings, store, files, clock=clock)):
        wait_until(lambda: store.get("old") is None and files.read(key) is None)


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)
