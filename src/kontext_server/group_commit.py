"""Group commit: the submits that reach the event loop in the same turn share one transaction.

Under load most of a submit's store cost is the commit itself (SQLite writes every page the
insert touched to the WAL, PostgreSQL waits for its WAL flush and a round trip), and the
submits that arrive together touch the same pages: the right edge of each index and the
queue counter. ``GroupCommit.submit`` parks the job and schedules one flush with
``call_soon``; every submit made before the loop gets to the flush joins it. There is no
timer and no waiting for company: an idle server commits a lone submit in the next loop
turn, a busy one commits as many as arrived.

Before the insert, ``admit`` (the service's queue limits) judges the batch's jobs in turn,
counting the ones admitted before: the submits that arrive together cannot overshoot a
limit together. A refused job's caller gets the refusal; the others go on.

One job that the store refuses (``submit_many`` is all or nothing) must not fail the others:
a failed batch is retried one job at a time, so each caller gets its own answer.

The flush runs on the event loop, as the single submits did before (docs/performance.md:
a thread-pool hop per submit cost more than the insert). Each event loop has its own
parked submits (an app may be served by several loops at once, e.g. test clients in two
threads); a loop stopped with submits parked strands only those.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Sequence

from kontext_server.jobs import NewJob, Submitted
from kontext_server.metrics import SUBMIT_BATCH_SIZE
from kontext_server.store.base import JobStore

__all__ = ["MAX_BATCH", "Admission", "GroupCommit"]

log = logging.getLogger(__name__)

# Jobs per transaction at most (a longer queue of parked submits commits in several): bounds
# how long one flush holds the loop and the database's write lock.
MAX_BATCH = 128

_Parked = tuple[NewJob, "asyncio.Future[Submitted]"]

Admission = Callable[[Sequence[NewJob]], Sequence[Exception | None]]
"""For each job of a batch in turn: the exception that refuses it, or ``None``."""


class GroupCommit:
    """Batches ``JobStore.submit_many`` calls made on one event loop at a time."""

    def __init__(
        self, store: JobStore, *, admit: Admission | None = None, max_batch: int = MAX_BATCH
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1; got {max_batch}")
        self._store = store
        self._admit = admit
        self._max_batch = max_batch
        self._parked: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[_Parked]] = (
            weakref.WeakKeyDictionary()
        )

    async def submit(self, job: NewJob) -> Submitted:
        """Insert ``job`` with the others of this loop turn; raises what ``submit_many``
        raised for it alone."""
        loop = asyncio.get_running_loop()
        parked = self._parked.setdefault(loop, [])
        future: asyncio.Future[Submitted] = loop.create_future()
        parked.append((job, future))
        if len(parked) == 1:
            loop.call_soon(self._flush, loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        parked = self._parked.pop(loop, [])
        for start in range(0, len(parked), self._max_batch):
            self._commit(self._admitted(parked[start : start + self._max_batch]))

    def _admitted(self, batch: Sequence[_Parked]) -> list[_Parked]:
        """The jobs that ``admit`` lets in; the others' callers get their refusal."""
        if self._admit is None:
            return list(batch)
        try:
            refusals = self._admit([job for job, _ in batch])
        except Exception as exc:  # e.g. the store is down: every caller is told
            for _, future in batch:
                _fail(future, exc)
            return []
        admitted = []
        for parked, refusal in zip(batch, refusals, strict=True):
            if refusal is None:
                admitted.append(parked)
            else:
                _fail(parked[1], refusal)
        return admitted

    def _commit(self, batch: Sequence[_Parked]) -> None:
        if not batch:
            return
        try:
            done = self._store.submit_many([job for job, _ in batch])
        except Exception as exc:
            if len(batch) > 1:
                log.warning(
                    "a batch of %d submits failed (%s); committing them one by one",
                    len(batch),
                    exc,
                )
                for parked in batch:
                    self._commit([parked])
                return
            _fail(batch[0][1], exc)
            return
        SUBMIT_BATCH_SIZE.observe(len(batch))
        for (_, future), result in zip(batch, done, strict=True):
            if not future.done():
                future.set_result(result)


def _fail(future: asyncio.Future[Submitted], exc: Exception) -> None:
    if not future.done():  # its caller may have gone (a cancelled request)
        future.set_exception(exc)
