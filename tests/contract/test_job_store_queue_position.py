"""Conformance: queue positions are served from memory (``store/queue_ranks.py``).

Where the queue is still, or changed only through the store object asked, the answer is what
a count of the table gives. Changes made through another handle (another process) show
within the staleness bound: the refresher's period (``DEFAULT_MAX_AGE_S``) plus one reload.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from contract.conftest import FakeClock
from kontext_server.domain.jobs import PRIORITY_LOW, Job, JobStatus, NewJob
from kontext_server.store.base import JobStore
from kontext_server.store.queue_ranks import DEFAULT_MAX_AGE_S

MakeJob = Callable[..., NewJob]
LEASE_S = 5.0
# A reload of a small test queue takes milliseconds; this leaves room for a loaded machine.
RELOAD_ALLOWANCE_S = 1.0


def counted_positions(store: JobStore, ids: list[str]) -> dict[str, int | None]:
    """What counting the table gives: queued jobs of the same engine ahead by (priority,
    seq), from the jobs as ``get`` reads them."""
    jobs = [job for job in (store.get(job_id) for job_id in ids) if job is not None]
    queued = [job for job in jobs if job.status is JobStatus.QUEUED]

    def ahead(job: Job) -> int:
        return sum(
            1
            for other in queued
            if other.engine == job.engine and (other.priority, other.seq) < (job.priority, job.seq)
        )

    return {job.id: ahead(job) if job.status is JobStatus.QUEUED else None for job in jobs}


def served_positions(store: JobStore, ids: list[str]) -> dict[str, int | None]:
    return {job_id: store.queue_position(job_id) for job_id in ids}


def test_positions_match_a_count_through_every_kind_of_move(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    jobs = [
        make_job(),
        make_job(priority=PRIORITY_LOW),
        make_job(engine="bfl"),
        make_job(),
        make_job(start_deadline_at=clock.now + 5),
        make_job(priority=PRIORITY_LOW),
        make_job(),
        make_job(),
    ]
    ids = [store.submit(job)[0].id for job in jobs]
    assert served_positions(store, ids) == counted_positions(store, ids)

    first = store.claim("w1", LEASE_S)  # the front leaves
    assert first is not None
    assert served_positions(store, ids) == counted_positions(store, ids)

    store.request_cancel(ids[3])  # one from the middle
    assert served_positions(store, ids) == counted_positions(store, ids)

    second = store.claim("w2", LEASE_S)
    assert second is not None
    assert store.release(second.id, "w2", second.attempts)  # handed back: its place again
    assert served_positions(store, ids) == counted_positions(store, ids)

    clock.advance(10)  # past the start deadline and the first lease
    assert store.expire_unstarted() == 1
    assert store.requeue_expired() == 1  # the first job is back at the front
    assert served_positions(store, ids) == counted_positions(store, ids)
    assert store.queue_position(first.id) == 0

    more = [store.submit(make_job())[0].id for _ in range(3)]
    assert served_positions(store, ids + more) == counted_positions(store, ids + more)


def test_position_of_a_job_read_needs_no_second_read(store: JobStore, make_job: MakeJob) -> None:
    ids = [store.submit(make_job())[0].id for _ in range(4)]
    for job_id, expected in zip(ids, range(4), strict=True):
        job = store.get(job_id)
        assert job is not None
        assert store.queue_position_of(job) == expected
    claimed = store.claim("w", LEASE_S)
    assert claimed is not None
    assert store.queue_position_of(claimed) is None


def test_a_new_handle_answers_exactly_at_once(
    store: JobStore, open_store: Callable[[], JobStore], make_job: MakeJob
) -> None:
    ids = [store.submit(make_job())[0].id for _ in range(5)]
    assert store.claim("w", LEASE_S) is not None
    other = open_store()  # another process: nothing loaded yet, so it loads on the question
    assert served_positions(other, ids) == counted_positions(store, ids)


def test_other_handles_changes_show_within_the_staleness_bound(
    store: JobStore, open_store: Callable[[], JobStore], make_job: MakeJob
) -> None:
    ids = [store.submit(make_job())[0].id for _ in range(6)]
    other = open_store()  # e.g. a worker process
    assert store.queue_position(ids[-1]) == 5  # asked: the refresher now keeps it fresh

    changed_at = time.monotonic()
    for _ in range(2):
        assert other.claim("w", LEASE_S) is not None
    other.request_cancel(ids[3])
    extra = other.submit(make_job())[0].id
    expected = counted_positions(store, [*ids, extra])

    bound_s = DEFAULT_MAX_AGE_S + RELOAD_ALLOWANCE_S
    while served_positions(store, [*ids, extra]) != expected:
        assert time.monotonic() - changed_at < bound_s, (
            f"positions still stale {bound_s} s after another handle's changes"
        )
        time.sleep(0.02)
    assert store.queue_position(ids[-1]) == 2


def test_positions_never_read_stale_when_the_queue_is_still(
    store: JobStore, open_store: Callable[[], JobStore], make_job: MakeJob
) -> None:
    other = open_store()
    ids = [other.submit(make_job(priority=PRIORITY_LOW if n % 2 else 0))[0].id for n in range(6)]
    # The store asked never saw these submits happen: it loads them on the first question,
    # and a still queue keeps answering the same.
    first = served_positions(store, ids)
    assert first == counted_positions(store, ids)
    time.sleep(DEFAULT_MAX_AGE_S * 1.2)  # a refresh or more
    assert served_positions(store, ids) == first
