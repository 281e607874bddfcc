"""``GroupCommit``: the submits of one event-loop turn share one ``submit_many`` call.

Over a real SQLite store, wrapped by ``RecordingStore`` to see the batches and to refuse a
chosen job (as a store refuses a whole batch: nothing of it is inserted).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from kontext_server.core.group_commit import GroupCommit
from kontext_server.domain.editing import EditInput
from kontext_server.domain.errors import StoreError
from kontext_server.domain.jobs import NewJob, Submitted
from kontext_server.metrics import SUBMIT_BATCH_SIZE
from kontext_server.store.base import JobStore
from kontext_server.store.sqlite import SQLiteJobStore

T = TypeVar("T")
# A caller whose future is never resolved would wait forever: fail fast instead.
TIMEOUT_S = 5.0


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` (a new event loop) with a time limit."""
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT_S))


def new_job(job_id: str | None = None) -> NewJob:
    return NewJob(
        id=job_id or str(uuid.uuid4()),
        endpoint="fal-ai/flux-pro/kontext/max",
        input=EditInput(prompt="make it blue", references=("https://example.com/cat.png",)),
    )


class RecordingStore:
    """A real SQLite store whose ``submit_many`` records each batch (its job ids) and raises
    ``StoreError``, inserting nothing, for a batch holding a refused job id."""

    def __init__(self, inner: SQLiteJobStore) -> None:
        self.inner = inner
        self.batches: list[list[str]] = []
        self.refused_ids: set[str] = set()

    def submit_many(self, jobs: Sequence[NewJob]) -> list[Submitted]:
        batch = [job.id for job in jobs]
        self.batches.append(batch)
        refused = self.refused_ids.intersection(batch)
        if refused:
            raise StoreError(f"refused job(s) {sorted(refused)}")
        return self.inner.submit_many(jobs)

    def batch_sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLiteJobStore]:
    store = SQLiteJobStore(tmp_path / "jobs.db")
    yield store
    store.close()


@pytest.fixture
def recorder(sqlite_store: SQLiteJobStore) -> RecordingStore:
    return RecordingStore(sqlite_store)


def group_over(recorder: RecordingStore, **options: Any) -> GroupCommit:
    return GroupCommit(cast(JobStore, recorder), **options)


async def submit_together(group: GroupCommit, jobs: Sequence[NewJob]) -> list[Any]:
    """Submit ``jobs`` from as many tasks started in the same loop turn; each task's answer
    or exception, in order."""
    return await asyncio.gather(*(group.submit(job) for job in jobs), return_exceptions=True)


def histogram_count_and_sum() -> tuple[float, float]:
    (metric,) = SUBMIT_BATCH_SIZE.collect()
    values = {sample.name: sample.value for sample in metric.samples if not sample.labels}
    return values[f"{metric.name}_count"], values[f"{metric.name}_sum"]


# --- batching -------------------------------------------------------------------------------------


def test_submits_of_one_loop_turn_share_one_submit_many_call(
    recorder: RecordingStore, sqlite_store: SQLiteJobStore
) -> None:
    group = group_over(recorder)
    jobs = [new_job() for _ in range(5)]

    answers = run(submit_together(group, jobs))

    assert recorder.batches == [[job.id for job in jobs]]
    assert [answer.job.id for answer in answers] == [job.id for job in jobs]
    assert [answer.created for answer in answers] == [True] * 5
    assert [answer.queue_position for answer in answers] == [0, 1, 2, 3, 4]
    assert [answer.job for answer in answers] == [sqlite_store.get(job.id) for job in jobs]


def test_submits_awaited_one_after_another_commit_separately(recorder: RecordingStore) -> None:
    group = group_over(recorder)
    jobs = [new_job() for _ in range(3)]

    async def one_by_one() -> list[Submitted]:
        return [await group.submit(job) for job in jobs]

    answers = run(one_by_one())

    assert recorder.batches == [[job.id] for job in jobs]
    assert [answer.queue_position for answer in answers] == [0, 1, 2]


def test_later_loop_turns_start_new_batches(recorder: RecordingStore) -> None:
    group = group_over(recorder)
    first, second = [new_job() for _ in range(3)], [new_job() for _ in range(2)]

    async def two_turns() -> list[Any]:
        return [*await submit_together(group, first), *await submit_together(group, second)]

    answers = run(two_turns())

    assert recorder.batch_sizes() == [3, 2]
    assert [answer.queue_position for answer in answers] == [0, 1, 2, 3, 4]


def test_max_batch_splits_one_turn_into_several_transactions_in_order(
    recorder: RecordingStore, sqlite_store: SQLiteJobStore
) -> None:
    group = group_over(recorder, max_batch=2)
    jobs = [new_job() for _ in range(5)]

    answers = run(submit_together(group, jobs))

    assert recorder.batch_sizes() == [2, 2, 1]
    assert [job_id for batch in recorder.batches for job_id in batch] == [j.id for j in jobs]
    assert [answer.queue_position for answer in answers] == [0, 1, 2, 3, 4]
    assert sqlite_store.queue_depth() == 5


@pytest.mark.parametrize("max_batch", [0, -1])
def test_max_batch_below_one_is_refused(recorder: RecordingStore, max_batch: int) -> None:
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        group_over(recorder, max_batch=max_batch)


# --- failures -------------------------------------------------------------------------------------


def test_a_refused_job_fails_only_its_own_caller(
    recorder: RecordingStore, sqlite_store: SQLiteJobStore
) -> None:
    group = group_over(recorder)
    jobs = [new_job() for _ in range(4)]
    recorder.refused_ids.add(jobs[1].id)

    answers = run(submit_together(group, jobs))

    assert isinstance(answers[1], StoreError)
    assert jobs[1].id in str(answers[1])
    good = [answers[0], answers[2], answers[3]]
    assert [answer.job.id for answer in good] == [jobs[0].id, jobs[2].id, jobs[3].id]
    assert [answer.queue_position for answer in good] == [0, 1, 2]
    # the whole batch once, then each job alone
    assert recorder.batches == [[job.id for job in jobs]] + [[job.id] for job in jobs]
    assert sqlite_store.get(jobs[1].id) is None
    assert sqlite_store.queue_depth() == 3


def test_a_duplicate_id_fails_only_its_own_caller_on_the_real_store(
    sqlite_store: SQLiteJobStore,
) -> None:
    group = GroupCommit(sqlite_store)
    existing, _ = sqlite_store.submit(new_job())
    before, duplicate, after = new_job(), new_job(existing.id), new_job()

    answers = run(submit_together(group, [before, duplicate, after]))

    assert isinstance(answers[1], StoreError)
    assert [answers[0].job.id, answers[2].job.id] == [before.id, after.id]
    assert [answers[0].queue_position, answers[2].queue_position] == [1, 2]
    assert sqlite_store.get(existing.id) == existing
    assert sqlite_store.queue_depth() == 3


def test_a_failure_of_a_lone_submit_reaches_its_caller(recorder: RecordingStore) -> None:
    group = group_over(recorder)
    job = new_job()
    recorder.refused_ids.add(job.id)

    with pytest.raises(StoreError, match="refused"):
        run(group.submit(job))

    assert recorder.batches == [[job.id]]  # not retried: it was alone


# --- callers that go away, loops that end ---------------------------------------------------------


def test_a_cancelled_caller_does_not_break_the_flush(
    recorder: RecordingStore, sqlite_store: SQLiteJobStore
) -> None:
    group = group_over(recorder)
    jobs = [new_job() for _ in range(3)]

    async def cancel_the_middle_one() -> tuple[list[Submitted], bool]:
        tasks = [asyncio.create_task(group.submit(job)) for job in jobs]
        await asyncio.sleep(0)  # every task has parked its job; the flush has not run
        tasks[1].cancel()
        answers = [await tasks[0], await tasks[2]]
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        return answers, tasks[1].cancelled()

    answers, cancelled = run(cancel_the_middle_one())

    assert cancelled
    assert [answer.job.id for answer in answers] == [jobs[0].id, jobs[2].id]
    # parked jobs are committed even when their caller left (the flush does not look)
    assert recorder.batches == [[job.id for job in jobs]]
    assert sqlite_store.queue_depth() == 3


def test_a_cancelled_caller_of_a_refused_job_does_not_break_the_others(
    recorder: RecordingStore, sqlite_store: SQLiteJobStore
) -> None:
    group = group_over(recorder)
    jobs = [new_job() for _ in range(3)]
    recorder.refused_ids.add(jobs[1].id)

    async def cancel_the_refused_one() -> list[Submitted]:
        tasks = [asyncio.create_task(group.submit(job)) for job in jobs]
        await asyncio.sleep(0)
        tasks[1].cancel()
        return [await tasks[0], await tasks[2]]

    answers = run(cancel_the_refused_one())

    assert [answer.job.id for answer in answers] == [jobs[0].id, jobs[2].id]
    assert sqlite_store.queue_depth() == 2
    assert run(group.submit(new_job())).queue_position == 2  # still usable


def test_a_new_loop_commits_after_a_loop_closed_with_a_parked_submit(
    recorder: RecordingStore, sqlite_store: SQLiteJobStore
) -> None:
    group = group_over(recorder)
    stranded, later = new_job(), new_job()
    dead_loop = asyncio.new_event_loop()
    parked = dead_loop.create_task(group.submit(stranded))
    dead_loop.call_soon(dead_loop.stop)  # stops after the task parked, before the flush ran
    dead_loop.run_forever()
    assert not parked.done() and recorder.batches == []
    dead_loop.close()

    answer = run(group.submit(later))

    assert (answer.job.id, answer.created, answer.queue_position) == (later.id, True, 0)
    assert recorder.batches == [[later.id]]  # the dead loop's submit was dropped
    assert sqlite_store.get(stranded.id) is None


def test_each_loop_of_several_in_turn_gets_its_answers(recorder: RecordingStore) -> None:
    group = group_over(recorder)

    positions = []
    for _ in range(3):
        answers = run(submit_together(group, [new_job(), new_job()]))  # a new loop each time
        positions.append([answer.queue_position for answer in answers])

    assert positions == [[0, 1], [2, 3], [4, 5]]
    assert recorder.batch_sizes() == [2, 2, 2]


# --- metrics --------------------------------------------------------------------------------------


def test_each_committed_batch_is_observed_with_its_size(recorder: RecordingStore) -> None:
    group = group_over(recorder)
    count_before, sum_before = histogram_count_and_sum()

    run(submit_together(group, [new_job() for _ in range(3)]))
    run(group.submit(new_job()))

    assert histogram_count_and_sum() == (count_before + 2, sum_before + 4)


def test_a_refused_batch_is_observed_as_the_singles_that_committed(
    recorder: RecordingStore,
) -> None:
    group = group_over(recorder)
    jobs = [new_job() for _ in range(3)]
    recorder.refused_ids.add(jobs[0].id)
    count_before, sum_before = histogram_count_and_sum()

    run(submit_together(group, jobs))

    assert histogram_count_and_sum() == (count_before + 2, sum_before + 2)


def test_two_event_loops_in_two_threads_each_get_their_answers(
    sqlite_store: SQLiteJobStore,
) -> None:
    group = GroupCommit(sqlite_store)
    batches = [[new_job() for _ in range(20)] for _ in range(2)]
    answers: list[list[Any]] = [[], []]
    both_parked = threading.Barrier(2, timeout=TIMEOUT_S)

    def serve(index: int) -> None:
        async def park_then_wait() -> list[Any]:
            pending = [asyncio.ensure_future(group.submit(job)) for job in batches[index]]

            async def hold_the_turn() -> None:
                # Runs in the turn the submits park in, before their flush (the next turn):
                # blocking here keeps both loops' submits parked at the same time.
                both_parked.wait()

            await asyncio.ensure_future(hold_the_turn())
            return list(await asyncio.gather(*pending))

        answers[index] = run(park_then_wait())

    threads = [threading.Thread(target=serve, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * TIMEOUT_S)

    for index in range(2):
        assert [answer.job.id for answer in answers[index]] == [j.id for j in batches[index]]
    assert sqlite_store.queue_depth() == 40


# --- stores that wait on the network: the flush leaves the loop ------------------------------


class NetworkStore(RecordingStore):
    """A store that says its calls wait on the network (as PostgreSQL's do), records the
    thread of each batch, and can hold a batch until the test lets it go."""

    waits_on_network = True

    def __init__(self, inner: SQLiteJobStore) -> None:
        super().__init__(inner)
        self.threads: list[threading.Thread] = []
        self.hold_first = threading.Event()
        self.hold_first.set()
        self.first_started = threading.Event()

    def submit_many(self, jobs: Sequence[NewJob]) -> list[Submitted]:
        self.threads.append(threading.current_thread())
        if len(self.threads) == 1:
            self.first_started.set()
            assert self.hold_first.wait(TIMEOUT_S)
        return super().submit_many(jobs)


def test_a_store_on_the_network_is_written_from_a_thread_not_the_loop(
    sqlite_store: SQLiteJobStore,
) -> None:
    store = NetworkStore(sqlite_store)
    group = GroupCommit(cast(JobStore, store))

    async def submit_some() -> tuple[list[Any], threading.Thread]:
        answers = await submit_together(group, [new_job() for _ in range(4)])
        return answers, threading.current_thread()

    answers, loop_thread = run(submit_some())

    assert [answer.queue_position for answer in answers] == [0, 1, 2, 3]
    assert store.batch_sizes() == [4]
    assert store.threads and loop_thread not in store.threads


def test_submits_arriving_while_a_batch_is_away_form_the_next_batch(
    sqlite_store: SQLiteJobStore,
) -> None:
    store = NetworkStore(sqlite_store)
    store.hold_first.clear()
    group = GroupCommit(cast(JobStore, store), flushes_away=1)
    first, later = [new_job() for _ in range(2)], [new_job() for _ in range(5)]

    async def while_away() -> list[Any]:
        away = asyncio.ensure_future(submit_together(group, first))
        await asyncio.to_thread(store.first_started.wait, TIMEOUT_S)
        parked = [asyncio.ensure_future(group.submit(job)) for job in later]
        await asyncio.sleep(0.05)  # many loop turns: none flushes while the first is away
        assert len(store.threads) == 1
        store.hold_first.set()
        return [*(await away), *(await asyncio.gather(*parked))]

    answers = run(while_away())

    assert store.batch_sizes() == [2, 5]
    assert [answer.job.id for answer in answers] == [job.id for job in first + later]
    assert [answer.queue_position for answer in answers] == list(range(7))


def test_a_second_batch_goes_while_the_first_is_away(sqlite_store: SQLiteJobStore) -> None:
    store = NetworkStore(sqlite_store)
    store.hold_first.clear()
    group = GroupCommit(cast(JobStore, store), flushes_away=2)
    first, second = [new_job() for _ in range(2)], [new_job() for _ in range(3)]

    async def while_away() -> list[Any]:
        away = asyncio.ensure_future(submit_together(group, first))
        await asyncio.to_thread(store.first_started.wait, TIMEOUT_S)
        sent = await submit_together(group, second)  # answered while the first is held
        assert not away.done()
        store.hold_first.set()
        return [*(await away), *sent]

    answers = run(while_away())

    assert store.batch_sizes() == [3, 2]  # as committed: the held first one after the second
    assert [answer.job.id for answer in answers] == [job.id for job in first + second]


def test_a_refusal_from_a_thread_reaches_only_its_caller(sqlite_store: SQLiteJobStore) -> None:
    store = NetworkStore(sqlite_store)
    jobs = [new_job() for _ in range(3)]
    store.refused_ids.add(jobs[1].id)
    group = GroupCommit(cast(JobStore, store))

    answers = run(submit_together(group, jobs))

    assert isinstance(answers[1], StoreError)
    assert [answers[0].job.id, answers[2].job.id] == [jobs[0].id, jobs[2].id]


def test_submits_parked_when_the_executor_is_gone_are_refused_not_left_waiting(
    sqlite_store: SQLiteJobStore,
) -> None:
    group = GroupCommit(cast(JobStore, NetworkStore(sqlite_store)))

    async def after_shutdown() -> list[Any]:
        await asyncio.get_running_loop().shutdown_default_executor()
        return await submit_together(group, [new_job(), new_job()])

    answers = run(after_shutdown())

    assert all(isinstance(answer, RuntimeError) for answer in answers)
    assert sqlite_store.queue_depth() == 0


def test_submit_now_judges_and_inserts_in_the_calling_thread(
    recorder: RecordingStore, sqlite_store: SQLiteJobStore
) -> None:
    full = RuntimeError("queue full")
    admitted, refused = new_job(), new_job()
    group = group_over(recorder, admit=lambda jobs: [full if j is refused else None for j in jobs])

    answer = group.submit_now(admitted)
    with pytest.raises(RuntimeError, match="queue full"):
        group.submit_now(refused)

    assert answer.job.id == admitted.id
    assert recorder.batches == [[admitted.id]]
    assert sqlite_store.get(refused.id) is None
