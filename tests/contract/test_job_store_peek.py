"""Conformance: ``peek_queued`` lists the jobs ``claim`` takes next, in its order, and changes
nothing (the worker's input prefetch reads it), on every backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kontext_server.domain.jobs import PRIORITY_LOW, Job, JobStatus, NewJob
from kontext_server.store.base import JobStore

if TYPE_CHECKING:
    from tests.contract.conftest import FakeClock

MakeJob = Callable[..., NewJob]
LEASE_S = 30.0


def submit(store: JobStore, job: NewJob) -> Job:
    created, inserted = store.submit(job)
    assert inserted
    return created


def ids(jobs: list[Job]) -> list[str]:
    return [job.id for job in jobs]


def claim_all(store: JobStore, engine: str = "local") -> list[str]:
    claimed = []
    while (job := store.claim("worker-1", LEASE_S, engine=engine)) is not None:
        claimed.append(job.id)
    return claimed


def test_peek_of_an_empty_queue_is_empty(store: JobStore) -> None:
    assert store.peek_queued(3) == []


def test_peek_lists_jobs_in_claim_order_up_to_the_limit(store: JobStore, make_job: MakeJob) -> None:
    low = submit(store, make_job(priority=PRIORITY_LOW))
    normal = [submit(store, make_job()) for _ in range(3)]
    assert ids(store.peek_queued(2)) == [normal[0].id, normal[1].id]
    expected = [*ids(normal), low.id]
    assert ids(store.peek_queued(10)) == expected
    assert claim_all(store) == expected  # claim takes exactly that order


def test_peek_of_zero_jobs_is_empty(store: JobStore, make_job: MakeJob) -> None:
    submit(store, make_job())
    assert store.peek_queued(0) == []


def test_peek_changes_nothing(store: JobStore, make_job: MakeJob) -> None:
    jobs = [submit(store, make_job()) for _ in range(3)]
    before = [(store.get(j.id), store.events(j.id), store.queue_position(j.id)) for j in jobs]
    peeked = store.peek_queued(3)
    assert peeked == [store.get(j.id) for j in jobs]  # the stored jobs, field for field
    after = [(store.get(j.id), store.events(j.id), store.queue_position(j.id)) for j in jobs]
    assert after == before
    assert all(job.status is JobStatus.QUEUED and job.attempts == 0 for job in peeked)
    assert store.queue_depth() == 3
    claimed = store.claim("worker-1", LEASE_S)
    assert claimed is not None and claimed.id == peeked[0].id and claimed.attempts == 1


def test_peek_leaves_out_running_and_canceled_jobs(store: JobStore, make_job: MakeJob) -> None:
    first, second, third = (submit(store, make_job()) for _ in range(3))
    store.claim("worker-2", LEASE_S)
    assert ids(store.peek_queued(5)) == [second.id, third.id]
    store.request_cancel(second.id)
    assert ids(store.peek_queued(5)) == [third.id]
    assert first.id not in ids(store.peek_queued(5))


def test_peek_takes_only_jobs_of_its_engine(store: JobStore, make_job: MakeJob) -> None:
    bfl = submit(store, make_job(engine="bfl"))
    local = submit(store, make_job())
    assert ids(store.peek_queued(5)) == [local.id]
    assert ids(store.peek_queued(5, engine="bfl")) == [bfl.id]
    assert store.peek_queued(5, engine="other") == []


def test_peek_skips_jobs_past_their_start_deadline_without_failing_them(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    late = submit(store, make_job(start_deadline_at=clock.now + 5))
    fine = submit(store, make_job(start_deadline_at=clock.now + 60))
    assert ids(store.peek_queued(5)) == [late.id, fine.id]
    clock.advance(10)
    assert ids(store.peek_queued(5)) == [fine.id]
    still = store.get(late.id)
    assert still is not None and still.status is JobStatus.QUEUED  # only claim fails it
    assert claim_all(store) == [fine.id]


def test_a_requeued_job_is_peeked_in_its_old_place(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    first, second = submit(store, make_job()), submit(store, make_job())
    store.claim("worker-1", LEASE_S)
    assert ids(store.peek_queued(5)) == [second.id]
    clock.advance(LEASE_S + 1)
    assert store.requeue_expired() == 1
    assert ids(store.peek_queued(5)) == [first.id, second.id]
