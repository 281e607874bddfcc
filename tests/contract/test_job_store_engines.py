"""Conformance: engines (one queue line each) and the fenced upstream record, on every
backend (docs/bfl-engine.md)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kontext_server.domain.jobs import PRIORITY_LOW, JobStatus, NewJob
from kontext_server.store.base import JobStore
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.store.sqlite_schema import MIGRATIONS

if TYPE_CHECKING:
    from tests.contract.conftest import FakeClock

MakeJob = Callable[..., NewJob]
LEASE_S = 30.0
RECORD = {"engine": "bfl", "seed": 5, "tasks": [{"id": "t-1", "polling_url": "https://x/1"}]}


def submit(store: JobStore, job: NewJob) -> str:
    created, inserted = store.submit(job)
    assert inserted
    return created.id


def test_jobs_default_to_the_local_engine(store: JobStore, make_job: MakeJob) -> None:
    job_id = submit(store, make_job())
    job = store.get(job_id)
    assert job is not None and job.engine == "local" and job.upstream is None


def test_claim_takes_only_jobs_of_its_engine(store: JobStore, make_job: MakeJob) -> None:
    bfl_id = submit(store, make_job(engine="bfl"))
    local_id = submit(store, make_job())
    claimed_local = store.claim("gpu-1", LEASE_S)
    assert claimed_local is not None and claimed_local.id == local_id
    assert store.claim("gpu-1", LEASE_S) is None  # the bfl job is not a local worker's
    claimed_bfl = store.claim("bfl-1", LEASE_S, engine="bfl")
    assert claimed_bfl is not None and claimed_bfl.id == bfl_id and claimed_bfl.engine == "bfl"
    assert store.claim("bfl-1", LEASE_S, engine="bfl") is None


def test_queue_position_counts_only_jobs_of_the_same_engine(
    store: JobStore, make_job: MakeJob
) -> None:
    local_ids = [submit(store, make_job()) for _ in range(3)]
    bfl_ids = [submit(store, make_job(engine="bfl")) for _ in range(2)]
    low_bfl = submit(store, make_job(engine="bfl", priority=PRIORITY_LOW))
    assert [store.queue_position(i) for i in local_ids] == [0, 1, 2]
    assert [store.queue_position(i) for i in bfl_ids] == [0, 1]
    assert store.queue_position(low_bfl) == 2
    assert store.queue_depth() == 6  # limits count every engine
    store.claim("bfl-1", LEASE_S, engine="bfl")
    assert store.queue_position(bfl_ids[1]) == 0
    assert store.queue_position(local_ids[2]) == 2


def test_set_upstream_is_fenced_and_kept_across_attempts(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    job_id = submit(store, make_job(engine="bfl"))
    job = store.claim("bfl-1", LEASE_S, engine="bfl")
    assert job is not None
    assert not store.set_upstream(job_id, "someone-else", job.attempts, RECORD)
    assert not store.set_upstream(job_id, "bfl-1", job.attempts + 1, RECORD)
    assert store.set_upstream(job_id, "bfl-1", job.attempts, RECORD)
    clock.advance(LEASE_S + 1)
    assert store.requeue_expired() == 1
    again = store.claim("bfl-2", LEASE_S, engine="bfl")
    assert again is not None and again.attempts == 2 and again.upstream == RECORD
    assert not store.set_upstream(job_id, "bfl-1", 1, {"stale": True})  # the old attempt
    assert store.release(job_id, "bfl-2", again.attempts)
    released = store.get(job_id)
    assert released is not None and released.status is JobStatus.QUEUED
    assert released.upstream == RECORD


def test_upstream_record_survives_reopening(
    open_store: Callable[[], JobStore], make_job: MakeJob
) -> None:
    store = open_store()
    job_id = submit(store, make_job(engine="bfl"))
    job = store.claim("bfl-1", LEASE_S, engine="bfl")
    assert job is not None
    assert store.set_upstream(job_id, "bfl-1", job.attempts, RECORD)
    reopened = open_store().get(job_id)
    assert reopened is not None and reopened.upstream == RECORD and reopened.engine == "bfl"


def test_wait_for_work_ignores_jobs_of_other_engines(store: JobStore, make_job: MakeJob) -> None:
    submit(store, make_job())
    started = time.monotonic()
    store.wait_for_work(0.3, engine="bfl")
    assert time.monotonic() - started >= 0.25
    started = time.monotonic()
    store.wait_for_work(5.0)  # a local job is queued: at once
    assert time.monotonic() - started < 1.0


def test_sqlite_v2_store_upgrades_with_its_queue_intact(tmp_path: Path) -> None:
    """Jobs queued before v3 become local jobs in the same order (queue counts rebuilt)."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL)")
    for number, statements in MIGRATIONS[:2]:
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (?, 0)", (number,))
    for index in range(3):
        conn.execute(
            "INSERT INTO jobs (id, endpoint, status, max_attempts, input, created_at)"
            " VALUES (?, 'e', 'queued', 3, '{}', 0)",
            (f"old-{index}",),
        )
    conn.close()
    store = SQLiteJobStore(path)
    try:
        assert [store.queue_position(f"old-{i}") for i in range(3)] == [0, 1, 2]
        assert store.queue_depth() == 3
        claimed = store.claim("gpu-1", LEASE_S)
        assert claimed is not None and claimed.id == "old-0" and claimed.engine == "local"
        assert store.queue_position("old-2") == 1
    finally:
        store.close()
