"""The queue service: submit / get / cancel / logs, in domain words, over the job store.

The HTTP skins (``http/``) translate their protocols to these verbs; nothing here knows about
HTTP status codes, a protocol's status names, or the shapes of results and webhook bodies
(the skins render those: ``http/webhooks.py``).

Submit enforces two bounds before it inserts: ``max_queued_per_key`` queued jobs per API key
and ``max_queue_size`` queued jobs in all; past either it raises ``QueueFullError`` (answered
429 with ``Retry-After``).

``MaintenanceLoop`` runs in the API process: it re-queues jobs whose worker lost its lease and
fails queued jobs past their start deadline, about once a second. Every API process may run
one; the store's maintenance calls are idempotent.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import uuid6

from kontext_server.config import Settings
from kontext_server.core.group_commit import GroupCommit
from kontext_server.core.periodic import PeriodicTask
from kontext_server.domain.editing import EditInput
from kontext_server.domain.errors import KontextError
from kontext_server.domain.jobs import (
    PRIORITY_NORMAL,
    CancelOutcome,
    Job,
    JobEvent,
    NewJob,
    Submitted,
)
from kontext_server.store.base import JobStore

__all__ = [
    "RETRY_AFTER_S",
    "IdempotencyConflictError",
    "MaintenanceLoop",
    "QueueFullError",
    "QueueService",
    "SubmitArgs",
    "SubmitOutcome",
]

_EVENTS_PAGE = 1000

# Retry-After for a full queue, a constant on purpose: the API process does not know how many
# workers drain the queue or how fast (they may be anywhere), so any "estimate" would be a
# guess. 10 s is about one 1 MP edit on an H100, so a slot has likely freed by then, and it is
# short enough that a polite client does not sit idle long after one has.
RETRY_AFTER_S = 10


class IdempotencyConflictError(KontextError):
    """An ``Idempotency-Key`` was reused with a different endpoint or input."""


class QueueFullError(KontextError):
    """Submit refused: too many queued requests for this API key, or in the whole queue. The
    message says which limit; ``retry_after_s`` is when trying again makes sense."""

    def __init__(self, message: str, *, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class SubmitOutcome:
    """What submit answers: the job, the queued jobs ahead of it, and whether it is new
    (``False`` when an ``Idempotency-Key`` matched an earlier, identical request)."""

    job: Job
    queue_position: int
    created: bool


class SubmitArgs(TypedDict, total=False):
    """``QueueService.submit``'s options."""

    owner: str | None  # API key id; None when authentication is off
    priority: int
    start_timeout_s: float | None
    webhook_url: str | None
    base_url: str | None
    idempotency_key: str | None
    retry: bool
    retention_s: float | None
    api: str | None  # the skin that needs something back later (NewJob.api)
    api_data: dict[str, Any] | None


class QueueService:
    """Submits, reads and cancels jobs for one API process.

    ``owner`` is an API key id, or ``None`` when authentication is off; a job owned by another
    key reads as absent, so callers cannot learn that it exists.
    """

    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self._clock = clock
        self._group_commit = GroupCommit(store, admit=self.refusals)

    # --- API verbs ------------------------------------------------------------------------------
    def submit(
        self, endpoint: str, edit: EditInput, **options: Unpack[SubmitArgs]
    ) -> SubmitOutcome:
        """Queue one edit (validated by its skin). ``start_timeout_s`` is a
        deadline to *start* (the job fails with ``request_timeout`` if no worker took it by
        then). ``retry=False`` runs it at most once (no re-queue after a lost worker).
        ``retention_s`` keeps the finished job (and its files) that long instead of the
        store's default.

        Raises ``QueueFullError`` when this owner, or the whole queue, is at its limit of
        queued jobs, and ``IdempotencyConflictError`` when ``idempotency_key`` was used by this
        owner for a different request."""
        new_job = self._new_job(endpoint, edit, options)
        return self._outcome(new_job, self._group_commit.submit_now(new_job))

    async def submit_async(
        self, endpoint: str, edit: EditInput, **options: Unpack[SubmitArgs]
    ) -> SubmitOutcome:
        """``submit`` for the event loop: the submits of one loop turn share one store
        transaction (``GroupCommit``)."""
        new_job = self._new_job(endpoint, edit, options)
        return self._outcome(new_job, await self._group_commit.submit(new_job))

    def _new_job(self, endpoint: str, edit: EditInput, options: SubmitArgs) -> NewJob:
        start_timeout_s = options.get("start_timeout_s")
        return NewJob(
            # Time-ordered (RFC 9562 version 7: a millisecond timestamp, then 76 random
            # bits): each new id lands at the end of the id index instead of a random page
            # of it, which halves the cost of an insert (docs/performance.md).
            id=str(uuid6.uuid7()),
            endpoint=endpoint,
            input=edit,
            owner=options.get("owner"),
            priority=options.get("priority", PRIORITY_NORMAL),
            max_attempts=self.settings.max_attempts if options.get("retry", True) else 1,
            start_deadline_at=None if start_timeout_s is None else self._clock() + start_timeout_s,
            webhook_url=options.get("webhook_url"),
            base_url=options.get("base_url"),
            idempotency_key=options.get("idempotency_key"),
            retention_s=options.get("retention_s"),
            engine=self.settings.engine_for(endpoint),
            api=options.get("api"),
            api_data=options.get("api_data"),
        )

    @staticmethod
    def _outcome(new_job: NewJob, done: Submitted) -> SubmitOutcome:
        job = done.job
        if not done.created and not new_job.same_request(job):
            raise IdempotencyConflictError(
                f"Idempotency-Key {new_job.idempotency_key!r} was already used for a different "
                f"request ({job.id}); use a new key for a new request"
            )
        return SubmitOutcome(job, done.queue_position, done.created)

    def refusals(self, jobs: Sequence[NewJob]) -> list[QueueFullError | None]:
        """For each job in turn, the ``QueueFullError`` that refuses it, or ``None`` when it
        may be inserted; the jobs admitted before it count as queued. Limits come before the
        insert, so a retried submit with an Idempotency-Key is also answered 429 while its
        owner is at the limit (the store has no lookup by key without inserting); the retry
        after Retry-After then finds the original request.

        Check, then insert: not atomic across processes (and threads). Submits of other API
        processes at the same moment may all pass, so a limit can be overshot by the submits
        in flight elsewhere. The limits protect the queue from floods; they do not meter
        usage, so a few extra jobs are harmless, while an atomic check would need a per-owner
        lock around a conditional insert in every backend, on the hot path of every submit.
        Within one process the submits of one batch are counted here, so they cannot
        overshoot together."""
        per_key_limit = self.settings.max_queued_per_key
        queued_in_all = self.store.queue_depth()
        stored_by_owner: dict[str | None, int] = {}  # queued in the store, read when needed
        admitted_by_owner: Counter[str | None] = Counter()  # admitted earlier in this batch
        answers: list[QueueFullError | None] = []
        for job in jobs:
            queued_for_key = 0
            # An owner's queued jobs are some of all queued jobs: below the per-key limit in
            # all, the per-owner count (a scan of the owner's queued jobs: ~10 % of the API's
            # CPU with 5,000 queued) cannot reach it.
            if queued_in_all >= per_key_limit:
                if job.owner not in stored_by_owner:
                    stored_by_owner[job.owner] = self.store.count_queued(job.owner)
                queued_for_key = stored_by_owner[job.owner] + admitted_by_owner[job.owner]
            refusal = self._refusal(job.owner, queued_for_key, queued_in_all)
            if refusal is None:
                queued_in_all += 1
                admitted_by_owner[job.owner] += 1
            answers.append(refusal)
        return answers

    def _refusal(
        self, owner: str | None, queued_for_key: int, queued_in_all: int
    ) -> QueueFullError | None:
        per_key_limit = self.settings.max_queued_per_key
        if queued_for_key >= per_key_limit:
            whose = "this API key" if owner is not None else "anonymous callers (no API key)"
            return QueueFullError(
                f"There are {queued_for_key} queued requests for {whose} (limit "
                f"{per_key_limit}); retry after {RETRY_AFTER_S} s, once some have started"
            )
        total_limit = self.settings.max_queue_size
        if queued_in_all >= total_limit:
            return QueueFullError(
                f"The queue is full: {queued_in_all} queued requests in all (limit "
                f"{total_limit}); retry after {RETRY_AFTER_S} s"
            )
        return None

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job, or ``None`` when it does not exist or belongs to another API key."""
        job = self.store.get(job_id)
        if job is None or (owner is not None and job.owner != owner):
            return None
        return job

    def queue_position(self, job: Job) -> int:
        """Queued jobs ahead of ``job`` (0 when it is not queued any more)."""
        return self.store.queue_position_of(job) or 0

    def cancel(self, job_id: str, owner: str | None = None) -> CancelOutcome:
        """Queued: canceled at once. Running: the worker stops within one step."""
        if self.get(job_id, owner) is None:
            return CancelOutcome.NOT_FOUND
        return self.store.request_cancel(job_id)

    def logs(self, job_id: str, after_id: int = 0) -> list[JobEvent]:
        """Every event of the job after ``after_id``, oldest first."""
        events: list[JobEvent] = []
        while True:
            page = self.store.events(job_id, after_id=after_id, limit=_EVENTS_PAGE)
            events.extend(page)
            if len(page) < _EVENTS_PAGE:
                return events
            after_id = page[-1].id


class MaintenanceLoop:
    """Re-queues expired leases and fails unstarted jobs past their deadline, every
    ``interval_s``, on a daemon thread. ``start()`` / ``stop()``; never raises."""

    def __init__(self, store: JobStore, *, interval_s: float = 1.0) -> None:
        self._store = store
        self._task = PeriodicTask("queue-maintenance", self.run_once, interval_s)

    def run_once(self) -> int:
        """One pass; returns how many jobs changed."""
        return self._store.requeue_expired() + self._store.expire_unstarted()

    def start(self) -> None:
        self._task.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._task.stop(timeout_s)
