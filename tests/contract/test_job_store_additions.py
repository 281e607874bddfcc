"""Conformance: retention and purge, per-owner and per-endpoint counts, hand-back on drain,
and the wake-up hint, on every backend."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kontext_server.domain.jobs import PRIORITY_LOW, JobStatus, NewJob, Progress, QueueDepth
from kontext_server.store.base import JobStore

if TYPE_CHECKING:
    from tests.contract.conftest import FakeClock

MakeJob = Callable[..., NewJob]
LEASE_S = 30.0
DAY_S = 24 * 3600.0
DEFAULT_RETENTION_S = 30 * DAY_S


def submit(store: JobStore, job: NewJob) -> str:
    created, inserted = store.submit(job)
    assert inserted
    return created.id


def run_to_end(
    store: JobStore,
    status: JobStatus = JobStatus.SUCCEEDED,
    *,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    error_type: str | None = None,
) -> str:
    """Claims the next job and finishes it; returns its id."""
    job = store.claim("worker-1", LEASE_S)
    assert job is not None
    finished = store.finish(
        job.id, "worker-1", job.attempts, status, result=result, error=error, error_type=error_type
    )
    assert finished
    return job.id


# --- retention and purge --------------------------------------------------------------------------


def test_finished_job_is_purged_after_the_default_retention(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    job_id = submit(store, make_job(webhook_url="https://hooks.example.com/x"))
    run_to_end(store)
    clock.advance(DEFAULT_RETENTION_S - 1)
    assert store.purge_expired() == []
    assert store.get(job_id) is not None
    clock.advance(2)
    assert [p.id for p in store.purge_expired()] == [job_id]
    assert store.get(job_id) is None
    assert store.events(job_id) == []
    assert store.claim_webhooks("test", limit=10, lease_s=60) == []  # its outbox row went too


def test_a_jobs_own_retention_overrides_the_default(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    short = submit(store, make_job(retention_s=60.0))
    default = submit(store, make_job())
    run_to_end(store)
    run_to_end(store)
    clock.advance(61)
    assert [p.id for p in store.purge_expired()] == [short]
    assert store.get(default) is not None


def test_retention_runs_from_the_finish_not_the_submit(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    job_id = submit(store, make_job(retention_s=60.0))
    clock.advance(3600)
    run_to_end(store)
    clock.advance(59)
    assert store.purge_expired() == []
    clock.advance(2)
    assert [p.id for p in store.purge_expired()] == [job_id]


def test_unfinished_jobs_are_never_purged(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    queued = submit(store, make_job(retention_s=1.0))
    running = submit(store, make_job(retention_s=1.0, priority=-1))
    store.claim("worker-1", 10 * DEFAULT_RETENTION_S)
    clock.advance(2 * DEFAULT_RETENTION_S)
    assert store.purge_expired() == []
    assert store.get(queued) is not None
    assert store.get(running) is not None


def test_every_way_to_a_final_status_starts_the_retention(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    canceled = submit(store, make_job(retention_s=10.0))
    store.request_cancel(canceled)
    timed_out = submit(store, make_job(retention_s=10.0, start_deadline_at=clock.now + 1))
    lost = submit(store, make_job(retention_s=10.0, max_attempts=1, priority=-1))
    store.claim("worker-1", LEASE_S)
    clock.advance(LEASE_S + 1)
    assert store.expire_unstarted() == 1
    assert store.requeue_expired() == 1
    clock.advance(11)
    assert sorted(p.id for p in store.purge_expired()) == sorted([canceled, timed_out, lost])


def test_purge_returns_the_file_keys_of_results(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    with_files = submit(store, make_job(retention_s=1.0))
    failed = submit(store, make_job(retention_s=1.0))
    result = {
        "images": [
            {"url": "http://x/files/a.jpeg", "file_key": "outputs/a.jpeg"},
            {"url": "https://example.com/b.png", "file_key": None},
            {"url": "http://x/files/c.png", "file_key": "outputs/c.png"},
        ],
        "seed": 1,
    }
    run_to_end(store, result=result)
    run_to_end(store, JobStatus.FAILED, error="boom", error_type="internal_error")
    clock.advance(2)
    purged = {p.id: p.file_keys for p in store.purge_expired()}
    assert purged == {with_files: ["outputs/a.jpeg", "outputs/c.png"], failed: []}


def test_purge_takes_at_most_limit_jobs_oldest_expiry_first(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    ids = [submit(store, make_job(retention_s=1.0)) for _ in range(5)]
    for _ in ids:
        run_to_end(store)
        clock.advance(1)
    clock.advance(2)
    assert [p.id for p in store.purge_expired(limit=2)] == ids[:2]
    assert [p.id for p in store.purge_expired(limit=2)] == ids[2:4]
    assert [p.id for p in store.purge_expired(limit=2)] == ids[4:]
    assert store.purge_expired(limit=2) == []


def test_purged_job_leaves_other_jobs_events_alone(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    gone = submit(store, make_job(retention_s=1.0))
    kept = submit(store, make_job())
    store.add_event(kept, "still here")
    run_to_end(store)
    clock.advance(2)
    assert [p.id for p in store.purge_expired()] == [gone]
    assert [e.message for e in store.events(kept)] == ["still here"]


# --- counts ---------------------------------------------------------------------------------------


def test_count_queued_counts_one_owners_queued_jobs(store: JobStore, make_job: MakeJob) -> None:
    for owner in ("key-1", "key-1", "key-1", "key-2", None, None):
        submit(store, make_job(owner=owner))
    store.claim("worker-1", LEASE_S)  # key-1's first job: running, no longer queued
    assert store.count_queued("key-1") == 2
    assert store.count_queued("key-2") == 1
    assert store.count_queued(None) == 2
    assert store.count_queued("key-3") == 0


def test_queue_depths_group_active_jobs_by_endpoint_and_priority(
    store: JobStore, make_job: MakeJob
) -> None:
    max_ep, pro_ep = "fal-ai/flux-pro/kontext/max", "fal-ai/flux-pro/kontext"
    submit(store, make_job(endpoint=max_ep, priority=-1))  # claimed first: running
    for _ in range(2):
        submit(store, make_job(endpoint=max_ep))
    submit(store, make_job(endpoint=max_ep, priority=PRIORITY_LOW))
    submit(store, make_job(endpoint=pro_ep))
    done = submit(store, make_job(endpoint=pro_ep, priority=-2))
    assert run_to_end(store) == done
    store.claim("worker-1", LEASE_S)
    assert store.queue_depths() == [
        QueueDepth(endpoint=pro_ep, priority=0, queued=1, running=0),
        QueueDepth(endpoint=max_ep, priority=-1, queued=0, running=1),
        QueueDepth(endpoint=max_ep, priority=0, queued=2, running=0),
        QueueDepth(endpoint=max_ep, priority=PRIORITY_LOW, queued=1, running=0),
    ]


def test_queue_depths_of_an_empty_store_is_empty(store: JobStore) -> None:
    assert store.queue_depths() == []


# --- release (graceful drain) ---------------------------------------------------------------------


def test_release_puts_the_job_back_in_its_place_without_counting_the_attempt(
    store: JobStore, make_job: MakeJob
) -> None:
    first = submit(store, make_job(max_attempts=1))
    second = submit(store, make_job())
    claimed = store.claim("worker-1", LEASE_S)
    assert claimed is not None
    assert claimed.id == first
    assert store.set_progress(first, "worker-1", 1, Progress(3, 28))
    assert store.release(first, "worker-1", 1)
    back = store.get(first)
    assert back is not None
    assert (back.status, back.seq, back.attempts) == (JobStatus.QUEUED, claimed.seq, 0)
    assert (back.lease_owner, back.lease_until, back.progress, back.started_at) == (
        None,
        None,
        None,
        None,
    )
    assert store.queue_position(first) == 0
    assert store.queue_position(second) == 1
    last = store.events(first)[-1]
    assert (last.level, last.message) == ("WARN", "handed back (worker draining)")
    again = store.claim("worker-2", LEASE_S)  # max_attempts=1: the hand-back did not use it up
    assert again is not None
    assert (again.id, again.attempts) == (first, 1)


def test_release_is_fenced(store: JobStore, make_job: MakeJob, clock: FakeClock) -> None:
    job_id = submit(store, make_job())
    store.claim("worker-1", LEASE_S)
    assert not store.release(job_id, "worker-2", 1)
    assert not store.release(job_id, "worker-1", 2)
    clock.advance(LEASE_S + 1)
    store.requeue_expired()
    store.claim("worker-2", LEASE_S)
    events_before = store.events(job_id)
    assert not store.release(job_id, "worker-1", 1)  # the zombie of attempt 1
    job = store.get(job_id)
    assert job is not None
    assert (job.status, job.lease_owner, job.attempts) == (JobStatus.RUNNING, "worker-2", 2)
    assert store.events(job_id) == events_before


def test_release_of_a_finished_job_changes_nothing(store: JobStore, make_job: MakeJob) -> None:
    submit(store, make_job())
    job_id = run_to_end(store)
    assert not store.release(job_id, "worker-1", 1)
    job = store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.SUCCEEDED


def test_release_of_a_job_being_cancelled_ends_it_canceled(
    store: JobStore, make_job: MakeJob
) -> None:
    job_id = submit(store, make_job(webhook_url="https://hooks.example.com/x"))
    store.claim("worker-1", LEASE_S)
    store.request_cancel(job_id)
    assert store.release(job_id, "worker-1", 1)
    job = store.get(job_id)
    assert job is not None
    assert (job.status, job.error_type) == (JobStatus.CANCELED, "client_cancelled")
    assert store.queue_depth() == 0
    assert [d.job_id for d in store.claim_webhooks("test", limit=10, lease_s=60)] == [job_id]


# --- wait_for_work --------------------------------------------------------------------------------


def test_wait_for_work_times_out_on_an_empty_queue(store: JobStore) -> None:
    started = time.monotonic()
    store.wait_for_work(0.3)
    assert 0.25 <= time.monotonic() - started < 2.0


def test_wait_for_work_returns_at_once_when_work_is_queued(
    store: JobStore, make_job: MakeJob
) -> None:
    submit(store, make_job())
    started = time.monotonic()
    store.wait_for_work(5.0)
    assert time.monotonic() - started < 1.0


def test_wait_for_work_wakes_on_a_submit_from_another_handle(
    open_store: Callable[[], JobStore], make_job: MakeJob
) -> None:
    waiter, submitter = open_store(), open_store()
    waiter.wait_for_work(0.01)  # the waiting side is set up (LISTEN, connections) first
    timer = threading.Timer(0.2, lambda: submitter.submit(make_job()))
    started = time.monotonic()
    timer.start()
    try:
        waiter.wait_for_work(10.0)
    finally:
        timer.join()
    assert time.monotonic() - started < 2.0
    assert waiter.claim("worker-1", LEASE_S) is not None
