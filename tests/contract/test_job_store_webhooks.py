"""Conformance: the webhook outbox (leased rows, retries, giving up), on every backend."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from kontext_server.domain.jobs import JobStatus, NewJob
from kontext_server.store.base import JobStore

if TYPE_CHECKING:
    from tests.contract.conftest import FakeClock

MakeJob = Callable[..., NewJob]
HOOK = "https://hooks.example.com/fal"


def finished_jobs_with_webhooks(store: JobStore, make_job: MakeJob, count: int) -> list[str]:
    """``count`` jobs canceled while queued: the quickest way to a final status + outbox row."""
    ids = [store.submit(make_job(webhook_url=HOOK))[0].id for _ in range(count)]
    for job_id in ids:
        store.request_cancel(job_id)
    return ids


def test_due_deliveries_come_oldest_first_up_to_the_limit(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    ids = []
    for _ in range(3):
        ids += finished_jobs_with_webhooks(store, make_job, 1)
        clock.advance(1)
    first_two = store.claim_webhooks("api-1", limit=2, lease_s=60)
    assert [d.job_id for d in first_two] == ids[:2]
    assert all((d.url, d.attempts) == (HOOK, 0) for d in first_two)
    assert [d.job_id for d in store.claim_webhooks("api-1", limit=2, lease_s=60)] == ids[2:]


def test_claimed_delivery_is_not_handed_out_again_until_its_claim_expires(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    [job_id] = finished_jobs_with_webhooks(store, make_job, 1)
    assert len(store.claim_webhooks("api-1", limit=10, lease_s=60)) == 1
    assert store.claim_webhooks("api-2", limit=10, lease_s=60) == []
    assert store.claim_webhooks("api-1", limit=10, lease_s=60) == []
    clock.advance(61)  # api-1 died while sending
    [again] = store.claim_webhooks("api-2", limit=10, lease_s=60)
    assert again.job_id == job_id


def test_two_claimers_never_get_the_same_row(store: JobStore, make_job: MakeJob) -> None:
    ids = finished_jobs_with_webhooks(store, make_job, 60)
    claimed: dict[str, list[str]] = {"api-1": [], "api-2": [], "api-3": []}
    barrier = threading.Barrier(len(claimed))

    def drain(claimer: str) -> None:
        barrier.wait()
        while batch := store.claim_webhooks(claimer, limit=3, lease_s=60):
            claimed[claimer] += [d.job_id for d in batch]

    threads = [threading.Thread(target=drain, args=(name,)) for name in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [job_id for batch in claimed.values() for job_id in batch]
    assert sorted(everything) == sorted(ids)


def test_retry_counts_the_attempt_and_waits_until_next_attempt_at(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    finished_jobs_with_webhooks(store, make_job, 1)
    [delivery] = store.claim_webhooks("api-1", limit=10, lease_s=60)
    store.webhook_retry(delivery.id, next_attempt_at=clock.now + 30, error="HTTP 503")
    assert store.claim_webhooks("api-1", limit=10, lease_s=60) == []
    clock.advance(29)
    assert store.claim_webhooks("api-1", limit=10, lease_s=60) == []
    clock.advance(1)
    [again] = store.claim_webhooks("api-2", limit=10, lease_s=60)
    assert (again.id, again.attempts, again.next_attempt_at) == (delivery.id, 1, clock.now)


def test_retry_releases_the_claim_at_once(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    finished_jobs_with_webhooks(store, make_job, 1)
    [delivery] = store.claim_webhooks("api-1", limit=10, lease_s=600)
    store.webhook_retry(delivery.id, next_attempt_at=clock.now, error="timeout")
    assert [d.id for d in store.claim_webhooks("api-2", limit=10, lease_s=60)] == [delivery.id]


def test_delivered_row_is_never_due_again(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    finished_jobs_with_webhooks(store, make_job, 1)
    [delivery] = store.claim_webhooks("api-1", limit=10, lease_s=60)
    store.webhook_delivered(delivery.id)
    clock.advance(10_000)
    assert store.claim_webhooks("api-1", limit=10, lease_s=60) == []


def test_given_up_row_is_never_due_again(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    finished_jobs_with_webhooks(store, make_job, 1)
    [delivery] = store.claim_webhooks("api-1", limit=10, lease_s=60)
    store.webhook_give_up(delivery.id, error="HTTP 410 after 10 attempts")
    clock.advance(10_000)
    assert store.claim_webhooks("api-1", limit=10, lease_s=60) == []


def test_each_final_status_enqueues_exactly_one_delivery(
    store: JobStore, make_job: MakeJob
) -> None:
    job = store.submit(make_job(webhook_url=HOOK))[0]
    claimed = store.claim("worker-1", 30)
    assert claimed is not None
    store.finish(job.id, "worker-1", claimed.attempts, JobStatus.SUCCEEDED, result={})
    store.request_cancel(job.id)  # already finished: must not enqueue again
    assert [d.job_id for d in store.claim_webhooks("api-1", limit=10, lease_s=60)] == [job.id]
