"""Conformance: ``JobStore.submit_many`` (group commit), on every backend.

Each job is submitted as ``submit`` would, in order, in one transaction; each answer carries
the job's queue position right after its own insert; a reused idempotency key answers the
existing job; and a batch that raises inserted nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kontext_server.domain.editing import EditInput
from kontext_server.domain.errors import StoreError
from kontext_server.domain.jobs import PRIORITY_LOW, JobStatus, NewJob, Submitted
from kontext_server.store.base import JobStore

MakeJob = Callable[..., NewJob]
LEASE_S = 30.0

UNICODE_EDIT = EditInput(
    prompt='ünïcode ✓ "quoted"',
    references=("https://example.com/ü.png", "data:image/png;base64,AAAA"),
    seed=2**53 + 1,
    guidance_scale=2.5,
)


def ids(answers: list[Submitted]) -> list[str]:
    return [answer.job.id for answer in answers]


def positions(answers: list[Submitted]) -> list[int]:
    return [answer.queue_position for answer in answers]


def claim_all(store: JobStore, engine: str = "local") -> list[str]:
    claimed: list[str] = []
    while (job := store.claim("worker-1", LEASE_S, engine=engine)) is not None:
        claimed.append(job.id)
    return claimed


# --- what a batch answers ------------------------------------------------------------------------


def test_a_batch_answers_each_job_in_order_as_created_and_queued(
    store: JobStore, make_job: MakeJob
) -> None:
    jobs = [make_job() for _ in range(4)]

    answers = store.submit_many(jobs)

    assert ids(answers) == [job.id for job in jobs]
    assert all(answer.created for answer in answers)
    assert all(answer.job.status is JobStatus.QUEUED for answer in answers)
    seqs = [answer.job.seq for answer in answers]
    assert seqs == sorted(set(seqs))


def test_each_answered_job_is_the_stored_row(store: JobStore, make_job: MakeJob) -> None:
    jobs = [
        make_job(owner="key-1", webhook_url="https://hooks.example.com/x", max_attempts=5),
        make_job(priority=PRIORITY_LOW, start_deadline_at=1_700_000_060.0, engine="bfl"),
        make_job(input=UNICODE_EDIT),
        make_job(
            owner="key-2",
            idempotency_key="idem-1",
            retention_s=60.0,
            base_url="https://api.example.com/",
            api="bfl",
            api_data={"webhook_secret": "s3cr\u00e9t"},
        ),
        make_job(),  # every optional column NULL, amid rows that set them
    ]

    answers = store.submit_many(jobs)

    assert [answer.job for answer in answers] == [store.get(job.id) for job in jobs]
    assert answers[3].job.api_data == {"webhook_secret": "s3cr\u00e9t"}
    (again,) = store.submit_many([make_job(owner="key-2", idempotency_key="idem-1")])
    assert (again.created, again.job.id) == (False, jobs[3].id)


def test_positions_count_the_queue_and_earlier_jobs_of_the_batch(
    store: JobStore, make_job: MakeJob
) -> None:
    store.submit(make_job())
    store.submit(make_job())

    answers = store.submit_many([make_job() for _ in range(3)])

    assert positions(answers) == [2, 3, 4]


def test_positions_leave_out_later_jobs_of_the_batch_and_other_engines(
    store: JobStore, make_job: MakeJob
) -> None:
    # A low-priority job first: the normal ones after it go ahead of it, but its own answer
    # is its position when it was inserted (nothing was ahead of it then).
    batch = [
        make_job(priority=PRIORITY_LOW),
        make_job(),
        make_job(),
        make_job(engine="bfl"),
        make_job(priority=PRIORITY_LOW),
        make_job(engine="bfl"),
    ]

    answers = store.submit_many(batch)

    assert positions(answers) == [0, 0, 1, 0, 3, 1]


def test_positions_after_the_batch_are_what_queue_position_says(
    store: JobStore, make_job: MakeJob
) -> None:
    low, first, second, other_engine = (
        make_job(priority=PRIORITY_LOW),
        make_job(),
        make_job(),
        make_job(engine="bfl"),
    )

    answers = store.submit_many([low, first, second, other_engine])

    now = [store.queue_position(job.id) for job in (low, first, second, other_engine)]
    assert now == [2, 0, 1, 0]
    # the answers were right for the jobs no later job of the batch went ahead of
    assert positions(answers)[1:] == now[1:]


def test_a_batch_of_normal_jobs_answers_the_positions_queue_position_reports(
    store: JobStore, make_job: MakeJob
) -> None:
    store.submit(make_job(priority=PRIORITY_LOW))
    store.submit(make_job())
    jobs = [make_job() for _ in range(5)]

    answers = store.submit_many(jobs)

    assert positions(answers) == [store.queue_position(job.id) for job in jobs]
    assert positions(answers) == [1, 2, 3, 4, 5]


def test_an_empty_batch_answers_nothing_and_inserts_nothing(
    store: JobStore, make_job: MakeJob
) -> None:
    store.submit(make_job())

    assert store.submit_many([]) == []
    assert store.queue_depth() == 1


def test_a_batch_of_one_answers_like_submit(store: JobStore, make_job: MakeJob) -> None:
    store.submit(make_job())
    job = make_job()

    (answer,) = store.submit_many([job])

    assert (answer.job, answer.created, answer.queue_position) == (store.get(job.id), True, 1)


# --- idempotency keys -----------------------------------------------------------------------------


def test_a_key_repeated_inside_a_batch_answers_the_first_job(
    store: JobStore, make_job: MakeJob
) -> None:
    store.submit(make_job())
    first = make_job(owner="key-1", idempotency_key="abc")
    repeat = make_job(owner="key-1", idempotency_key="abc")
    after = make_job()

    answers = store.submit_many([first, repeat, after])

    assert [answer.created for answer in answers] == [True, False, True]
    assert answers[1].job == answers[0].job == store.get(first.id)
    assert store.get(repeat.id) is None
    assert positions(answers) == [1, 1, 2]
    assert store.queue_depth() == 3


def test_a_key_used_by_an_earlier_batch_answers_that_job(
    store: JobStore, make_job: MakeJob
) -> None:
    (earlier,) = store.submit_many([make_job(idempotency_key="abc")])
    store.submit(make_job())

    answers = store.submit_many([make_job(), make_job(idempotency_key="abc")])

    assert [answer.created for answer in answers] == [True, False]
    assert answers[1].job == earlier.job
    assert answers[1].queue_position == 0  # still first in line
    assert store.queue_depth() == 3


def test_a_key_of_a_running_job_answers_it_at_position_zero(
    store: JobStore, make_job: MakeJob
) -> None:
    store.submit(make_job(idempotency_key="abc"))
    running = store.claim("worker-1", LEASE_S)
    assert running is not None
    store.submit(make_job())

    answer, _ = store.submit_many([make_job(idempotency_key="abc"), make_job()])

    assert (answer.created, answer.job.id, answer.job.status) == (
        False,
        running.id,
        JobStatus.RUNNING,
    )
    assert answer.queue_position == 0


def test_the_same_key_of_two_owners_in_one_batch_makes_two_jobs(
    store: JobStore, make_job: MakeJob
) -> None:
    answers = store.submit_many(
        [
            make_job(owner="key-1", idempotency_key="abc"),
            make_job(owner="key-2", idempotency_key="abc"),
        ]
    )

    assert [answer.created for answer in answers] == [True, True]
    assert answers[0].job.id != answers[1].job.id


def test_submit_after_a_batch_sees_the_batch_keys_and_queue(
    store: JobStore, make_job: MakeJob
) -> None:
    batch = store.submit_many([make_job(idempotency_key="abc"), make_job()])

    again, inserted = store.submit(make_job(idempotency_key="abc"))
    later, later_inserted = store.submit(make_job())

    assert (again, inserted) == (batch[0].job, False)
    assert later_inserted
    assert later.seq > batch[1].job.seq
    assert store.queue_position(later.id) == 2


# --- all or nothing -------------------------------------------------------------------------------


def test_a_batch_with_an_existing_id_raises_and_inserts_none_of_it(
    store: JobStore, make_job: MakeJob
) -> None:
    existing, _ = store.submit(make_job())
    before, after = make_job(), make_job()

    with pytest.raises(StoreError):
        store.submit_many([before, make_job(id=existing.id), after])

    assert store.get(before.id) is None
    assert store.get(after.id) is None
    assert store.get(existing.id) == existing
    assert store.queue_depth() == 1


def test_an_id_repeated_inside_a_batch_raises_and_inserts_none_of_it(
    store: JobStore, make_job: MakeJob
) -> None:
    job = make_job()

    with pytest.raises(StoreError):
        store.submit_many([job, make_job(id=job.id)])

    assert store.get(job.id) is None
    assert store.queue_depth() == 0


def test_a_failed_batch_leaves_its_keys_unused_and_the_store_usable(
    store: JobStore, make_job: MakeJob
) -> None:
    existing, _ = store.submit(make_job())
    keyed = make_job(owner="key-1", idempotency_key="abc")

    with pytest.raises(StoreError):
        store.submit_many([keyed, make_job(id=existing.id)])

    retried = make_job(owner="key-1", idempotency_key="abc")
    answers = store.submit_many([retried, make_job()])
    assert [answer.created for answer in answers] == [True, True]
    assert answers[0].job.id == retried.id
    assert positions(answers) == [1, 2]
    assert store.queue_depth() == 3


# --- the queue after a batch ---------------------------------------------------------------------


def test_claims_after_a_batch_take_its_jobs_in_submit_order(
    store: JobStore, make_job: MakeJob
) -> None:
    jobs = [make_job() for _ in range(6)]

    store.submit_many(jobs)

    assert claim_all(store) == [job.id for job in jobs]


def test_claims_after_a_mixed_batch_follow_priority_then_submit_order(
    store: JobStore, make_job: MakeJob
) -> None:
    low_1, normal_1, bfl, normal_2, low_2 = (
        make_job(priority=PRIORITY_LOW),
        make_job(),
        make_job(engine="bfl"),
        make_job(),
        make_job(priority=PRIORITY_LOW),
    )

    store.submit_many([low_1, normal_1, bfl, normal_2, low_2])

    assert claim_all(store) == [normal_1.id, normal_2.id, low_1.id, low_2.id]
    assert claim_all(store, engine="bfl") == [bfl.id]


def test_batches_and_single_submits_interleave_in_one_line(
    store: JobStore, make_job: MakeJob
) -> None:
    single_1, batch_1, batch_2, single_2 = (make_job() for _ in range(4))

    store.submit(single_1)
    store.submit_many([batch_1, batch_2])
    store.submit(single_2)

    assert store.queue_position(single_2.id) == 3
    assert claim_all(store) == [single_1.id, batch_1.id, batch_2.id, single_2.id]
