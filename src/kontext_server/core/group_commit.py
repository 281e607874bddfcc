"""Group commit: the submits that reach the event loop together share one transaction.

Under load most of a submit's store cost is the commit itself (SQLite writes every page the
insert touched to the WAL, PostgreSQL waits for its WAL flush and a round trip), and the
submits that arrive together touch the same pages: the right edge of each index and the
queue counter. ``GroupCommit.submit`` parks the job and schedules one flush with
``call_soon``; every submit made before the loop gets to the flush joins it. There is no
timer and no waiting for company: an idle server commits a lone submit in the next loop
turn, a busy one commits as many as arrived.

Before the insert, ``admit`` (the service's queue limits) judges the batch's jobs in turn,
counting the ones admitted before: the submits of one batch cannot overshoot a limit
together. With two batches in the database at once (PostgreSQL, below), the second is judged
before the first has committed, so together they may pass a limit by at most one batch
(``MAX_BATCH``); the limits are soft by that much. A refused job's caller gets the refusal;
the others go on.

One job that the store refuses (``submit_many`` is all or nothing) must not fail the others:
a failed batch is retried one job at a time, so each caller gets its own answer.

Where the flush runs depends on the store (``JobStore.waits_on_network``):

* SQLite: on the event loop, as the single submits did before (docs/performance.md: a
  thread-pool hop per submit cost more than the insert).
* PostgreSQL: in the loop's default executor, up to ``FLUSHES_AWAY`` flushes at a time per
  loop; the loop goes on serving while it waits for the database. The submits that arrive
  while a flush is away form the next batch, sent at once while fewer than
  ``FLUSHES_AWAY`` are away, else as soon as one is answered. A commit waits for its WAL
  flush (milliseconds with fsync on), and PostgreSQL flushes the WAL of commits that wait
  together once: a second batch in flight shares the first one's wait instead of queuing
  behind it.

Each event loop has its own parked submits (an app may be served by several loops at once,
e.g. test clients in two threads); a loop stopped with submits parked strands only those.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kontext_server.domain.jobs import NewJob, Submitted
from kontext_server.metrics import SUBMIT_BATCH_SIZE
from kontext_server.store.base import JobStore

__all__ = ["MAX_BATCH", "Admission", "GroupCommit"]

log = logging.getLogger(__name__)

# Jobs per transaction at most (a longer queue of parked submits commits in several): bounds
# how long one flush holds the loop and the database's write lock.
MAX_BATCH = 128
FLUSHES_AWAY = 2  # batches in the database at once per loop, for a store off the loop

_Parked = tuple[NewJob, "asyncio.Future[Submitted]"]
_Outcome = Submitted | Exception  # what one caller is answered

Admission = Callable[[Sequence[NewJob]], Sequence[Exception | None]]
"""For each job of a batch in turn: the exception that refuses it, or ``None``."""


@dataclass
class _LoopBatches:
    """One event loop's parked submits, and whether a flush of it is away in a thread."""

    parked: list[_Parked] = field(default_factory=list)
    away: int = 0  # flushes in the executor now


class GroupCommit:
    """Batches ``JobStore.submit_many`` calls made on an event loop."""

    def __init__(
        self,
        store: JobStore,
        *,
        admit: Admission | None = None,
        max_batch: int = MAX_BATCH,
        flushes_away: int = FLUSHES_AWAY,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1; got {max_batch}")
        self._store = store
        self._admit = admit
        self._max_batch = max_batch
        self._off_loop = store.waits_on_network
        self._flushes_away = flushes_away
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopBatches] = (
            weakref.WeakKeyDictionary()
        )

    async def submit(self, job: NewJob) -> Submitted:
        """Insert ``job`` with the others parked with it; raises what refused it (the queue
        limits, or what ``submit_many`` raised for it alone)."""
        loop = asyncio.get_running_loop()
        batches = self._loops.setdefault(loop, _LoopBatches())
        future: asyncio.Future[Submitted] = loop.create_future()
        batches.parked.append((job, future))
        if len(batches.parked) == 1 and batches.away < self._flushes_away:
            loop.call_soon(self._flush, loop, batches)
        return await future

    def submit_now(self, job: NewJob) -> Submitted:
        """``submit`` for callers off the event loop (threads, CLI): ``job`` alone, judged
        and inserted in the calling thread."""
        (outcome,) = self._outcomes([job])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _flush(self, loop: asyncio.AbstractEventLoop, batches: _LoopBatches) -> None:
        if not batches.parked or (self._off_loop and batches.away >= self._flushes_away):
            return  # taken by an earlier flush, or sent when a flush away is answered
        parked, batches.parked = batches.parked, []
        chunks = [
            parked[start : start + self._max_batch]
            for start in range(0, len(parked), self._max_batch)
        ]
        jobs = [[job for job, _ in chunk] for chunk in chunks]
        if not self._off_loop:
            for chunk, outcomes in zip(chunks, map(self._outcomes, jobs), strict=True):
                _deliver(chunk, outcomes)
            return
        try:
            away = loop.run_in_executor(None, functools.partial(_map, self._outcomes, jobs))
        except RuntimeError as exc:  # the loop's executor is shut down: the server is stopping
            for chunk in chunks:
                _deliver(chunk, [exc] * len(chunk))
            return
        batches.away += 1
        away.add_done_callback(functools.partial(self._flushed, loop, batches, chunks))

    def _flushed(
        self,
        loop: asyncio.AbstractEventLoop,
        batches: _LoopBatches,
        chunks: list[list[_Parked]],
        away: asyncio.Future[list[list[_Outcome]]],
    ) -> None:
        batches.away -= 1
        try:
            answered = away.result()
        except Exception as exc:  # the executor refused the work (the loop is shutting down)
            answered = [[exc] * len(chunk) for chunk in chunks]
        for chunk, outcomes in zip(chunks, answered, strict=True):
            _deliver(chunk, outcomes)
        if batches.parked:  # arrived while this batch was away: the next batch, at once
            self._flush(loop, batches)

    def _outcomes(self, jobs: Sequence[NewJob]) -> list[_Outcome]:
        """Each job's answer: refused by ``admit``, or inserted (or refused) by the store."""
        try:
            refusals = list(self._admit(jobs)) if self._admit else [None] * len(jobs)
        except Exception as exc:  # e.g. the store is down: every caller is told
            return [exc] * len(jobs)
        admitted = [job for job, refusal in zip(jobs, refusals, strict=True) if refusal is None]
        inserted = iter(self._insert(admitted))
        return [next(inserted) if refusal is None else refusal for refusal in refusals]

    def _insert(self, jobs: Sequence[NewJob]) -> list[_Outcome]:
        if not jobs:
            return []
        try:
            done: list[_Outcome] = list(self._store.submit_many(jobs))
        except Exception as exc:
            if len(jobs) == 1:
                return [exc]
            log.warning(
                "a batch of %d submits failed (%s); committing them one by one", len(jobs), exc
            )
            return [outcome for job in jobs for outcome in self._insert([job])]
        SUBMIT_BATCH_SIZE.observe(len(jobs))
        return done


def _map(
    outcomes: Callable[[Sequence[NewJob]], list[_Outcome]], batches: list[list[NewJob]]
) -> list[list[_Outcome]]:
    return [outcomes(jobs) for jobs in batches]


def _deliver(chunk: Sequence[_Parked], outcomes: Sequence[_Outcome]) -> None:
    for (_, future), outcome in zip(chunk, outcomes, strict=True):
        if future.done():  # its caller has gone (a cancelled request)
            continue
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
