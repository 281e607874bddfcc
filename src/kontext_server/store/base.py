"""The ``JobStore`` protocol: one state machine, one conformance suite, several backends.

State machine (``JobStatus``)::

    queued --claim--> running --finish(succeeded|failed|canceled)--> final
      |  ^               |
      |  +--lease expired, attempts < max_attempts (keeps its place: same priority, seq)
      |                  +--lease expired, attempts >= max_attempts --> failed (runner_disconnected)
      +--cancel--> canceled (at once)      running --cancel--> cancel_requested, worker finishes
      +--start deadline passed--> failed (request_timeout)

Rules every backend keeps:

* ``claim`` is atomic: two workers never hold the same job; ``attempts`` is bumped at claim
  so that crashes count. Order: lowest ``priority`` first, then lowest ``seq``.
* Writes from a worker (``heartbeat``, ``set_progress``, ``finish``) are *fenced* by
  ``(job_id, worker_id, attempt)``: a worker that lost its lease changes nothing and is
  told so by a ``False`` return.
* Reaching a final status with a ``webhook_url`` enqueues one outbox row in the same
  transaction.
* ``queue_position`` counts queued jobs ahead by (priority, seq); the answer comes from an
  in-memory picture of the queue (``queue_ranks.QueueRanks``) whose cost does not grow with
  the queue. It is exact where only this store object changed the queue (the conformance
  suite's still queues) and at most ``QueueRanks``' ``max_age_s`` plus one reload behind other
  processes' changes (fal's position is a hint).
* Engines (``Job.engine``, docs/bfl-engine.md): each engine is its own queue line. ``claim``
  takes only its engine's jobs, and ``queue_position`` counts only queued jobs of the same
  engine (jobs of another engine are run by other workers and do not delay this one).
  ``queue_depth`` and ``count_queued`` count every engine (the limits protect the store).
* ``upstream`` (``set_upstream``) survives re-queues and new attempts: it is how an upstream
  engine resumes the task it already paid for instead of submitting another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from kontext_server.domain.jobs import (
    ApiKey,
    CancelOutcome,
    Job,
    JobEvent,
    JobStatus,
    NewJob,
    Progress,
    PurgedJob,
    QueueDepth,
    Submitted,
    WebhookDelivery,
)

__all__ = ["JobStore"]


class JobStore(Protocol):
    """Durable job queue. Thread-safe: each thread may call any method."""

    # True when a call waits for another process (PostgreSQL: a round trip to the server).
    # The API then makes its calls off the event loop; False (SQLite: a local file, calls of
    # microseconds) keeps them on it, where a thread hop would cost more than the call.
    waits_on_network: bool

    # --- API side ---------------------------------------------------------------------------
    def submit(self, job: NewJob) -> tuple[Job, bool]:
        """Insert ``job``; returns ``(job, True)``. With an ``idempotency_key`` already used by
        the same owner, inserts nothing and returns ``(existing_job, False)``."""
        ...

    def submit_many(self, jobs: Sequence[NewJob]) -> list[Submitted]:
        """``submit`` for each job, in order, in one transaction (group commit: the API
        batches the submits that arrive together), each with its queue position right after
        its insert (later jobs of the batch are not counted). All or nothing: when it raises,
        no job of the batch was inserted."""
        ...

    def get(self, job_id: str) -> Job | None: ...

    def queue_position(self, job_id: str) -> int | None:
        """Queued jobs ahead of this one; ``None`` unless it is queued. Served from memory
        (``queue_ranks.py``): exact for this store object's own changes, and reflecting other
        processes' within ``QueueRanks``' ``max_age_s`` (1 s) plus one reload of the queue."""
        ...

    def queue_position_of(self, job: Job) -> int | None:
        """``queue_position`` of a job just read (``get``), without reading it again: no
        round trip. ``None`` unless ``job.status`` is queued."""
        ...

    def queue_depth(self) -> int: ...

    def count_queued(self, owner: str | None) -> int:
        """Queued jobs of one owner (``None``: the anonymous owner), for per-key limits."""
        ...

    def queue_depths(self) -> list[QueueDepth]:
        """Queued and running counts by (endpoint, priority), for metrics."""
        ...

    def request_cancel(self, job_id: str) -> CancelOutcome:
        """Queued: canceled at once. Running: flag set, the worker stops within one step."""
        ...

    def events(self, job_id: str, after_id: int = 0, limit: int = 1000) -> list[JobEvent]: ...

    # --- worker side ------------------------------------------------------------------------
    def claim(self, worker_id: str, lease_s: float, *, engine: str = "local") -> Job | None:
        """Atomically take the best queued job of ``engine`` (status -> running,
        attempts + 1, lease)."""
        ...

    def peek_queued(self, limit: int, *, engine: str = "local") -> list[Job]:
        """Read only: up to ``limit`` queued jobs of ``engine`` that ``claim`` would take
        next, in claim order (priority, then seq), skipping jobs past their start deadline
        (``claim`` never starts those). Changes nothing; by the time the caller looks, another
        worker may have taken them (a worker uses it to fetch inputs ahead of its claim)."""
        ...

    def wait_for_work(self, timeout_s: float, *, engine: str = "local") -> None:
        """Block until a job of ``engine`` may be claimable or ``timeout_s`` passes. A hint
        only (e.g. PostgreSQL LISTEN/NOTIFY); callers still claim, and a backend may simply
        sleep."""
        ...

    def release(self, job_id: str, worker_id: str, attempt: int) -> bool:
        """Hand a running job back (graceful drain): queued again in its place, the attempt
        not counted. Fenced like ``finish``."""
        ...

    def heartbeat(self, job_id: str, worker_id: str, attempt: int, lease_s: float) -> bool:
        """Extend the lease; ``False`` when the lease is no longer this worker's."""
        ...

    def set_upstream(
        self, job_id: str, worker_id: str, attempt: int, upstream: dict[str, Any]
    ) -> bool:
        """Fenced like ``finish``: replace the job's ``upstream`` record (JSON), which later
        attempts read from ``Job.upstream``; ``False`` if this attempt no longer owns it."""
        ...

    def is_cancel_requested(self, job_id: str) -> bool: ...

    def set_progress(self, job_id: str, worker_id: str, attempt: int, progress: Progress) -> bool:
        """Fenced progress write (also appends a ``step i/N`` event)."""
        ...

    def add_event(
        self, job_id: str, message: str, level: str = "INFO", data: dict[str, Any] | None = None
    ) -> None: ...

    def finish(
        self,
        job_id: str,
        worker_id: str,
        attempt: int,
        status: JobStatus,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        error_type: str | None = None,
    ) -> bool:
        """Fenced completion to a final status; ``False`` if this attempt no longer owns it."""
        ...

    # --- maintenance (any process, idempotent) -------------------------------------------------
    def requeue_expired(self) -> int:
        """Expired leases: back to queued keeping their place, or failed past max_attempts."""
        ...

    def expire_unstarted(self) -> int:
        """Queued jobs past their start deadline -> failed with error_type request_timeout."""
        ...

    def purge_expired(self, limit: int = 500) -> list[PurgedJob]:
        """Delete finished jobs whose retention has passed (their events and outbox rows
        too); returns them with the file keys of their results, for the caller to delete.
        A job's retention runs from ``finished_at``: ``NewJob.retention_s`` or the store's
        default (30 days, as fal keeps payloads)."""
        ...

    # --- webhook outbox -----------------------------------------------------------------------
    def claim_webhooks(self, claimer: str, limit: int, lease_s: float) -> list[WebhookDelivery]:
        """Due deliveries, leased to ``claimer`` so that one API process sends each."""
        ...

    def webhook_delivered(self, delivery_id: int) -> None: ...

    def webhook_retry(self, delivery_id: int, next_attempt_at: float, error: str) -> None: ...

    def webhook_give_up(self, delivery_id: int, error: str) -> None: ...

    # --- API keys (stored hashed) ---------------------------------------------------------------
    def create_api_key(self, key_id: str, name: str, key_hash: str) -> ApiKey: ...

    def find_api_key(self, key_hash: str) -> ApiKey | None:
        """The active (not revoked) key with this hash."""
        ...

    def list_api_keys(self) -> list[ApiKey]: ...

    def revoke_api_key(self, key_id: str) -> bool: ...

    def known_has_api_keys(self) -> bool | None:
        """``has_api_keys``' answer if it is known without asking the database (cached),
        else ``None``: lets authentication skip a thread hop when it needs no I/O."""
        ...

    def has_api_keys(self) -> bool:
        """True when at least one active key exists (authentication on)."""
        ...

    def ping(self) -> None:
        """One round trip to the database (readiness); raises ``StoreError`` (or
        ``StoreUnavailableError``) when it cannot be reached."""
        ...

    def close(self) -> None: ...
