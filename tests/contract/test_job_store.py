"""Conformance: the job state machine and the rules of ``store/base.py``, on every backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from kontext_server.domain.editing import EditInput
from kontext_server.domain.errors import StoreError
from kontext_server.domain.jobs import (
    PRIORITY_LOW,
    CancelOutcome,
    Job,
    JobStatus,
    NewJob,
    Progress,
)
from kontext_server.store.base import JobStore

if TYPE_CHECKING:
    from tests.contract.conftest import FakeClock

MakeJob = Callable[..., NewJob]
LEASE_S = 30.0

UNICODE_EDIT = EditInput(
    prompt='ünïcode ✓ "quoted"',
    references=("https://example.com/ü.png", "data:image/png;base64,AAAA"),
    seed=2**53 + 1,
    guidance_scale=2.5,
)


def submit(store: JobStore, job: NewJob) -> Job:
    created, inserted = store.submit(job)
    assert inserted
    return created


def claim(store: JobStore, worker_id: str = "worker-1") -> Job:
    job = store.claim(worker_id, LEASE_S)
    assert job is not None, "expected a queued job to claim"
    return job


def current(store: JobStore, job_id: str) -> Job:
    job = store.get(job_id)
    assert job is not None
    return job


def lose_lease(store: JobStore, clock: FakeClock) -> int:
    clock.advance(LEASE_S + 1)
    return store.requeue_expired()


def pending_webhooks(store: JobStore) -> list[str]:
    return [d.job_id for d in store.claim_webhooks("test", limit=100, lease_s=60)]


# --- submit and get -------------------------------------------------------------------------------


def test_submit_stores_a_queued_job_with_its_fields(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    job = make_job(
        owner="key-1",
        priority=PRIORITY_LOW,
        max_attempts=5,
        start_deadline_at=clock.now + 60,
        webhook_url="https://hooks.example.com/x",
        base_url="http://127.0.0.1:8000",
        input=UNICODE_EDIT,
    )
    created = submit(store, job)
    assert created == current(store, job.id)
    assert (created.id, created.endpoint, created.input) == (job.id, job.endpoint, job.input)
    assert (created.owner, created.priority, created.max_attempts) == ("key-1", PRIORITY_LOW, 5)
    assert created.start_deadline_at == clock.now + 60
    assert (created.webhook_url, created.base_url) == (job.webhook_url, job.base_url)
    assert created.status is JobStatus.QUEUED
    assert (created.attempts, created.cancel_requested, created.progress) == (0, False, None)
    assert (created.lease_owner, created.lease_until, created.result) == (None, None, None)
    assert (created.created_at, created.started_at, created.finished_at) == (clock.now, None, None)


def test_get_of_unknown_job_is_none(store: JobStore) -> None:
    assert store.get("no-such-job") is None


def test_seq_grows_with_each_submit(store: JobStore, make_job: MakeJob) -> None:
    seqs = [submit(store, make_job()).seq for _ in range(5)]
    assert seqs == sorted(set(seqs))


def test_submit_of_an_existing_id_raises(store: JobStore, make_job: MakeJob) -> None:
    job = submit(store, make_job())
    with pytest.raises(StoreError):
        store.submit(make_job(id=job.id))
    assert store.queue_depth() == 1
    submit(store, make_job())  # the failed transaction left nothing open
    assert store.queue_depth() == 2


def test_idempotency_key_returns_the_existing_job(store: JobStore, make_job: MakeJob) -> None:
    first = submit(store, make_job(owner="key-1", idempotency_key="abc"))
    again, inserted = store.submit(make_job(owner="key-1", idempotency_key="abc"))
    assert not inserted
    assert again == first
    assert store.queue_depth() == 1


def test_idempotency_key_is_scoped_to_its_owner(store: JobStore, make_job: MakeJob) -> None:
    mine = submit(store, make_job(owner="key-1", idempotency_key="abc"))
    theirs = submit(store, make_job(owner="key-2", idempotency_key="abc"))
    assert mine.id != theirs.id


def test_idempotency_key_without_owner_still_deduplicates(
    store: JobStore, make_job: MakeJob
) -> None:
    first = submit(store, make_job(idempotency_key="abc"))
    again, inserted = store.submit(make_job(idempotency_key="abc"))
    assert (again.id, inserted) == (first.id, False)


# --- claim ----------------------------------------------------------------------------------------


def test_claim_of_empty_queue_returns_none(store: JobStore) -> None:
    assert store.claim("worker-1", LEASE_S) is None


def test_claim_takes_jobs_in_submission_order(store: JobStore, make_job: MakeJob) -> None:
    ids = [submit(store, make_job()).id for _ in range(4)]
    assert [claim(store).id for _ in ids] == ids
    assert store.claim("worker-1", LEASE_S) is None


def test_low_priority_waits_behind_normal(store: JobStore, make_job: MakeJob) -> None:
    low = submit(store, make_job(priority=PRIORITY_LOW))
    normal = [submit(store, make_job()).id for _ in range(2)]
    assert [claim(store).id for _ in range(3)] == [*normal, low.id]


def test_claim_bumps_attempts_and_takes_a_lease(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    job = submit(store, make_job())
    clock.advance(3)
    claimed = claim(store, "worker-7")
    assert claimed.id == job.id
    assert claimed.status is JobStatus.RUNNING
    assert claimed.attempts == 1
    assert (claimed.lease_owner, claimed.lease_until) == ("worker-7", clock.now + LEASE_S)
    assert claimed.started_at == clock.now
    assert current(store, job.id) == claimed


def test_claim_logs_the_attempt(store: JobStore, make_job: MakeJob) -> None:
    job = submit(store, make_job())
    claim(store)
    assert [e.message for e in store.events(job.id)] == ["started (attempt 1)"]


# --- fenced worker writes -------------------------------------------------------------------------


def test_heartbeat_extends_the_lease(store: JobStore, make_job: MakeJob, clock: FakeClock) -> None:
    job = submit(store, make_job())
    claimed = claim(store)
    clock.advance(20)
    assert store.heartbeat(job.id, "worker-1", claimed.attempts, LEASE_S)
    assert current(store, job.id).lease_until == clock.now + LEASE_S


def test_set_progress_records_the_step_and_logs_it(store: JobStore, make_job: MakeJob) -> None:
    job = submit(store, make_job())
    claimed = claim(store)
    assert store.set_progress(job.id, "worker-1", claimed.attempts, Progress(step=3, total=28))
    assert current(store, job.id).progress == Progress(step=3, total=28)
    last = store.events(job.id)[-1]
    assert (last.message, last.data) == ("step 3/28", {"step": 3, "total": 28})


def test_finish_stores_the_result(store: JobStore, make_job: MakeJob, clock: FakeClock) -> None:
    job = submit(store, make_job())
    claimed = claim(store)
    clock.advance(2)
    result = {"images": [{"url": "http://x/files/a.jpeg", "width": 1024}], "seed": 42}
    assert store.finish(job.id, "worker-1", claimed.attempts, JobStatus.SUCCEEDED, result=result)
    done = current(store, job.id)
    assert (done.status, done.result, done.error, done.error_type) == (
        JobStatus.SUCCEEDED,
        result,
        None,
        None,
    )
    assert done.finished_at == clock.now


def test_finish_as_failed_keeps_error_and_type(store: JobStore, make_job: MakeJob) -> None:
    job = submit(store, make_job())
    claimed = claim(store)
    assert store.finish(
        job.id,
        "worker-1",
        claimed.attempts,
        JobStatus.FAILED,
        error="could not fetch image_url",
        error_type="file_download_error",
    )
    done = current(store, job.id)
    assert (done.status, done.error, done.error_type) == (
        JobStatus.FAILED,
        "could not fetch image_url",
        "file_download_error",
    )
    assert store.events(job.id)[-1].level == "ERROR"


def test_finish_with_a_non_final_status_raises(store: JobStore, make_job: MakeJob) -> None:
    job = submit(store, make_job())
    claimed = claim(store)
    with pytest.raises(StoreError):
        store.finish(job.id, "worker-1", claimed.attempts, JobStatus.QUEUED)


def test_second_finish_changes_nothing(store: JobStore, make_job: MakeJob) -> None:
    job = submit(store, make_job())
    claimed = claim(store)
    assert store.finish(job.id, "worker-1", 1, JobStatus.SUCCEEDED, result={"n": 1})
    assert not store.finish(job.id, "worker-1", 1, JobStatus.FAILED, error="late")
    assert not store.heartbeat(job.id, "worker-1", claimed.attempts, LEASE_S)
    assert current(store, job.id).result == {"n": 1}


def test_another_worker_cannot_write_to_a_job(store: JobStore, make_job: MakeJob) -> None:
    job = submit(store, make_job())
    claim(store, "worker-1")
    before = current(store, job.id)
    assert not store.heartbeat(job.id, "worker-2", 1, LEASE_S)
    assert not store.set_progress(job.id, "worker-2", 1, Progress(1, 4))
    assert not store.finish(job.id, "worker-2", 1, JobStatus.SUCCEEDED, result={})
    assert current(store, job.id) == before


def test_stale_attempt_changes_nothing(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    job = submit(store, make_job())
    claim(store, "worker-1")
    lose_lease(store, clock)
    second = claim(store, "worker-1")  # the same worker id, restarted: only attempt differs
    assert second.attempts == 2
    before = current(store, job.id)
    events_before = store.events(job.id)
    assert not store.heartbeat(job.id, "worker-1", 1, LEASE_S)
    assert not store.set_progress(job.id, "worker-1", 1, Progress(2, 4))
    assert not store.finish(job.id, "worker-1", 1, JobStatus.SUCCEEDED, result={"old": True})
    assert current(store, job.id) == before
    assert store.events(job.id) == events_before
    assert pending_webhooks(store) == []


# --- lease expiry ---------------------------------------------------------------------------------


def test_live_leases_are_not_requeued(store: JobStore, make_job: MakeJob, clock: FakeClock) -> None:
    job = submit(store, make_job())
    claim(store)
    clock.advance(LEASE_S - 1)
    assert store.requeue_expired() == 0
    assert current(store, job.id).status is JobStatus.RUNNING


def test_heartbeat_keeps_a_job_from_being_requeued(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    job = submit(store, make_job())
    claim(store)
    for _ in range(3):
        clock.advance(LEASE_S - 1)
        assert store.heartbeat(job.id, "worker-1", 1, LEASE_S)
        assert store.requeue_expired() == 0
    assert current(store, job.id).status is JobStatus.RUNNING


def test_expired_lease_is_requeued_and_keeps_its_place(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    first = submit(store, make_job())
    second = submit(store, make_job())
    claimed = claim(store)
    assert store.set_progress(first.id, "worker-1", 1, Progress(2, 4))
    third = submit(store, make_job())
    assert lose_lease(store, clock) == 1
    requeued = current(store, first.id)
    assert requeued.status is JobStatus.QUEUED
    assert (requeued.seq, requeued.priority) == (claimed.seq, claimed.priority)
    assert (requeued.lease_owner, requeued.lease_until, requeued.progress) == (None, None, None)
    assert requeued.attempts == 1
    assert store.queue_position(first.id) == 0
    assert store.queue_position(third.id) == 2
    last = store.events(first.id)[-1]
    assert (last.level, last.message) == ("WARN", "worker lost; retrying")
    assert [claim(store, "worker-2").id for _ in range(3)] == [first.id, second.id, third.id]
    assert current(store, first.id).attempts == 2


def test_lease_expiry_after_max_attempts_fails_the_job(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    job = submit(store, make_job(max_attempts=2, webhook_url="https://hooks.example.com/x"))
    claim(store)
    lose_lease(store, clock)
    claim(store)
    assert lose_lease(store, clock) == 1
    failed = current(store, job.id)
    assert (failed.status, failed.error_type, failed.attempts) == (
        JobStatus.FAILED,
        "runner_disconnected",
        2,
    )
    assert failed.error
    assert failed.finished_at == clock.now
    assert store.claim("worker-1", LEASE_S) is None
    assert pending_webhooks(store) == [job.id]


def test_expired_lease_of_a_cancelled_job_ends_it_canceled(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    job = submit(store, make_job())
    claim(store)
    assert store.request_cancel(job.id) is CancelOutcome.REQUESTED
    assert lose_lease(store, clock) == 1
    done = current(store, job.id)
    assert (done.status, done.error_type) == (JobStatus.CANCELED, "client_cancelled")
    assert store.queue_depth() == 0


# --- cancel ---------------------------------------------------------------------------------------


def test_cancel_of_queued_job_is_immediate(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    job = submit(store, make_job(webhook_url="https://hooks.example.com/x"))
    behind = submit(store, make_job())
    clock.advance(1)
    assert store.request_cancel(job.id) is CancelOutcome.CANCELED
    done = current(store, job.id)
    assert done.status is JobStatus.CANCELED
    assert (done.error, done.error_type) == ("Request cancelled", "client_cancelled")
    assert (done.finished_at, done.attempts) == (clock.now, 0)
    assert store.is_cancel_requested(job.id)  # a zombie attempt still running it stops too
    assert store.queue_position(behind.id) == 0
    assert claim(store).id == behind.id
    assert pending_webhooks(store) == [job.id]
    assert store.events(job.id)[-1].message == "canceled"


def test_cancel_of_running_job_sets_a_flag_the_worker_sees(
    store: JobStore, make_job: MakeJob
) -> None:
    job = submit(store, make_job(webhook_url="https://hooks.example.com/x"))
    claimed = claim(store)
    assert not store.is_cancel_requested(job.id)
    assert store.request_cancel(job.id) is CancelOutcome.REQUESTED
    assert store.is_cancel_requested(job.id)
    running = current(store, job.id)
    assert (running.status, running.cancel_requested) == (JobStatus.RUNNING, True)
    assert pending_webhooks(store) == []
    assert store.request_cancel(job.id) is CancelOutcome.REQUESTED  # asking twice is fine
    assert store.finish(job.id, "worker-1", claimed.attempts, JobStatus.CANCELED)
    done = current(store, job.id)
    assert (done.status, done.error, done.error_type) == (
        JobStatus.CANCELED,
        "Request cancelled",
        "client_cancelled",
    )
    assert pending_webhooks(store) == [job.id]


@pytest.mark.parametrize("final", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED])
def test_cancel_of_finished_job_is_already_finished(
    store: JobStore, make_job: MakeJob, final: JobStatus
) -> None:
    job = submit(store, make_job())
    claimed = claim(store)
    store.finish(job.id, "worker-1", claimed.attempts, final, error="x", error_type="y")
    before = current(store, job.id)
    assert store.request_cancel(job.id) is CancelOutcome.ALREADY_FINISHED
    assert current(store, job.id) == before


def test_cancel_of_unknown_job_is_not_found(store: JobStore) -> None:
    assert store.request_cancel("no-such-job") is CancelOutcome.NOT_FOUND
    assert not store.is_cancel_requested("no-such-job")


# --- start deadline -------------------------------------------------------------------------------


def test_job_past_its_start_deadline_is_never_started(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    job = submit(store, make_job(start_deadline_at=clock.now + 10, webhook_url="https://h/x"))
    clock.advance(11)
    assert store.claim("worker-1", LEASE_S) is None
    failed = current(store, job.id)
    assert (failed.status, failed.error_type, failed.attempts) == (
        JobStatus.FAILED,
        "request_timeout",
        0,
    )
    assert failed.error
    assert pending_webhooks(store) == [job.id]


def test_claim_skips_a_timed_out_job_and_starts_the_next(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    late = submit(store, make_job(start_deadline_at=clock.now + 10))
    fine = submit(store, make_job(start_deadline_at=clock.now + 100))
    clock.advance(11)
    assert claim(store).id == fine.id
    assert current(store, late.id).error_type == "request_timeout"


def test_expire_unstarted_fails_only_jobs_past_their_deadline(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    late = submit(store, make_job(start_deadline_at=clock.now + 10))
    later = submit(store, make_job(start_deadline_at=clock.now + 100))
    no_deadline = submit(store, make_job())
    started = submit(store, make_job(start_deadline_at=clock.now + 10, priority=-1))
    claim(store)  # takes `started` (best priority) before its deadline
    clock.advance(11)
    assert store.expire_unstarted() == 1
    assert current(store, late.id).status is JobStatus.FAILED
    assert current(store, later.id).status is JobStatus.QUEUED
    assert current(store, no_deadline.id).status is JobStatus.QUEUED
    assert current(store, started.id).status is JobStatus.RUNNING
    assert store.expire_unstarted() == 0


# --- queue position and depth ---------------------------------------------------------------------


def test_queue_position_counts_jobs_ahead_by_priority_then_age(
    store: JobStore, make_job: MakeJob
) -> None:
    low_1 = submit(store, make_job(priority=PRIORITY_LOW))
    normal_1 = submit(store, make_job())
    low_2 = submit(store, make_job(priority=PRIORITY_LOW))
    normal_2 = submit(store, make_job())
    positions = {j.id: store.queue_position(j.id) for j in (low_1, normal_1, low_2, normal_2)}
    assert positions == {normal_1.id: 0, normal_2.id: 1, low_1.id: 2, low_2.id: 3}
    assert store.queue_depth() == 4
    claim(store)
    assert store.queue_position(low_2.id) == 2
    assert store.queue_depth() == 3


def test_queue_position_is_none_unless_queued(store: JobStore, make_job: MakeJob) -> None:
    running = submit(store, make_job())
    canceled = submit(store, make_job())
    claim(store)
    store.request_cancel(canceled.id)
    assert store.queue_position(running.id) is None
    assert store.queue_position(canceled.id) is None
    assert store.queue_position("no-such-job") is None
    assert store.queue_depth() == 0


# --- events ---------------------------------------------------------------------------------------


def test_events_come_in_order_and_resume_after_an_id(
    store: JobStore, make_job: MakeJob, clock: FakeClock
) -> None:
    job = submit(store, make_job())
    other = submit(store, make_job())
    for i in range(5):
        clock.advance(1)
        store.add_event(job.id, f"line {i}", level="DEBUG" if i % 2 else "INFO", data={"i": i})
        store.add_event(other.id, f"other {i}")
    events = store.events(job.id)
    assert [e.message for e in events] == [f"line {i}" for i in range(5)]
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert [e.data for e in events] == [{"i": i} for i in range(5)]
    assert [e.level for e in events] == ["INFO", "DEBUG", "INFO", "DEBUG", "INFO"]
    assert all(e.job_id == job.id for e in events)
    assert events[2].at == events[0].at + 2
    assert store.events(job.id, after_id=events[1].id) == events[2:]
    assert store.events(job.id, after_id=events[1].id, limit=2) == events[2:4]
    assert store.events(job.id, after_id=events[-1].id) == []


def test_event_without_data_has_empty_data(store: JobStore, make_job: MakeJob) -> None:
    job = submit(store, make_job())
    store.add_event(job.id, "hello")
    assert store.events(job.id)[0].data == {}


def test_event_for_unknown_job_raises(store: JobStore) -> None:
    with pytest.raises(StoreError):
        store.add_event("no-such-job", "hello")


def test_finish_closes_the_log_with_a_final_event(store: JobStore, make_job: MakeJob) -> None:
    job = submit(store, make_job())
    claim(store)
    store.set_progress(job.id, "worker-1", 1, Progress(1, 2))
    store.set_progress(job.id, "worker-1", 1, Progress(2, 2))
    store.finish(job.id, "worker-1", 1, JobStatus.SUCCEEDED, result={})
    messages = [e.message for e in store.events(job.id)]
    assert messages[:3] == ["started (attempt 1)", "step 1/2", "step 2/2"]
    assert len(messages) == 4


# --- webhooks enqueued at the end -----------------------------------------------------------------


def test_finish_enqueues_one_webhook_only_when_a_url_is_set(
    store: JobStore, make_job: MakeJob
) -> None:
    with_hook = submit(store, make_job(webhook_url="https://hooks.example.com/x"))
    without = submit(store, make_job())
    for job in (with_hook, without):
        claimed = claim(store)
        assert claimed.id == job.id
        store.finish(job.id, "worker-1", claimed.attempts, JobStatus.SUCCEEDED, result={})
    deliveries = store.claim_webhooks("test", limit=100, lease_s=60)
    assert [(d.job_id, d.url, d.attempts) for d in deliveries] == [
        (with_hook.id, "https://hooks.example.com/x", 0)
    ]


# --- restart --------------------------------------------------------------------------------------


def test_everything_survives_closing_and_reopening(
    open_store: Callable[[], JobStore], make_job: MakeJob, clock: FakeClock
) -> None:
    store = open_store()
    running = submit(store, make_job(webhook_url="https://hooks.example.com/r"))
    done = submit(store, make_job(webhook_url="https://hooks.example.com/d"))
    queued = submit(store, make_job(owner="key-1", idempotency_key="k"))
    claim(store)  # running
    claim(store)  # done
    store.finish(done.id, "worker-1", 1, JobStatus.SUCCEEDED, result={"ok": True})
    store.set_progress(running.id, "worker-1", 1, Progress(1, 4))
    store.create_api_key("key-1", "laptop", "hash-1")
    jobs_before = {j.id: store.get(j.id) for j in (running, done, queued)}
    events_before = store.events(running.id)
    store.close()

    reopened = open_store()
    assert {j: reopened.get(j) for j in jobs_before} == jobs_before
    assert reopened.events(running.id) == events_before
    assert reopened.queue_position(queued.id) == 0
    assert reopened.find_api_key("hash-1") is not None
    assert reopened.submit(make_job(owner="key-1", idempotency_key="k"))[1] is False
    assert pending_webhooks(reopened) == [done.id]
    # Work goes on where it stopped: the running job's lease still holds, then expires.
    assert reopened.finish(running.id, "worker-1", 1, JobStatus.SUCCEEDED, result={})
    assert claim(reopened).id == queued.id
    lose_lease(reopened, clock)
    assert current(reopened, queued.id).status is JobStatus.QUEUED
