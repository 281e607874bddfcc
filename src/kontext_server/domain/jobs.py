"""Domain types of the queue. fal's words (request_id, IN_QUEUE, ...) live only in ``http/``.

Times are unix seconds as floats (``*_at``); durations carry their unit (``lease_s``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from kontext_server.domain.editing import EditInput, EditOutput

__all__ = [
    "PRIORITY_LOW",
    "PRIORITY_NORMAL",
    "ApiKey",
    "CancelOutcome",
    "Job",
    "JobEvent",
    "JobStatus",
    "NewJob",
    "Progress",
    "PurgedJob",
    "QueueDepth",
    "Submitted",
    "WebhookDelivery",
]

PRIORITY_NORMAL = 0
PRIORITY_LOW = 1  # sorts after every normal job


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


@dataclass(frozen=True, slots=True)
class Progress:
    step: int
    total: int


@dataclass(frozen=True, slots=True)
class NewJob:
    """What submit inserts: the edit (``input``), who asked, and how it is queued.

    ``api`` names the protocol skin that needs something back later (e.g. ``"bfl"``: its
    webhook shape), with its own data in ``api_data`` (e.g. a webhook secret); ``None`` for
    the default (fal). Neither is read by the core or the workers."""

    id: str
    endpoint: str  # e.g. "fal-ai/flux-pro/kontext/max"
    input: EditInput
    owner: str | None = None  # API key id; None when authentication is off
    priority: int = PRIORITY_NORMAL
    max_attempts: int = 3
    start_deadline_at: float | None = None  # X-Fal-Request-Timeout, absolute
    webhook_url: str | None = None
    base_url: str | None = None  # where the client reached us; used to render webhook URLs
    idempotency_key: str | None = None
    retention_s: float | None = None  # kept this long after finishing; None: the store default
    engine: str = "local"  # who runs it: "local" (our GPUs) or "bfl" (Black Forest Labs' API)
    api: str | None = None
    api_data: dict[str, Any] | None = None

    def same_request(self, job: Job) -> bool:
        """Whether ``job`` (found by this one's idempotency key) asked for the same thing."""
        return (self.endpoint, self.input, self.api, self.api_data) == (
            job.endpoint,
            job.input,
            job.api,
            job.api_data,
        )


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    seq: int
    endpoint: str
    input: EditInput
    owner: str | None
    priority: int
    status: JobStatus
    attempts: int
    max_attempts: int
    cancel_requested: bool
    lease_owner: str | None
    lease_until: float | None
    result: dict[str, Any] | None
    error: str | None
    error_type: str | None
    progress: Progress | None
    start_deadline_at: float | None
    webhook_url: str | None
    base_url: str | None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    engine: str = "local"
    # What an upstream engine recorded before waiting on its provider (``set_upstream``), so
    # that a later attempt resumes the same upstream task instead of paying for another.
    upstream: dict[str, Any] | None = None
    api: str | None = None  # NewJob.api
    api_data: dict[str, Any] | None = None

    @property
    def output(self) -> EditOutput | None:
        """``result`` read as an ``EditOutput`` (None without a result); ``ValueError`` when
        the stored record is not one."""
        return None if self.result is None else EditOutput.from_record(self.result)


@dataclass(frozen=True, slots=True)
class Submitted:
    """One answer of ``JobStore.submit_many``."""

    job: Job
    created: bool  # False: an earlier job with the same idempotency key (``job`` is that one)
    queue_position: int  # queued jobs ahead of it when the batch committed (0 if not queued)


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One line of a job's log (the source of status ``logs`` and of SSE updates)."""

    id: int  # monotonic per store; SSE resumes after it
    job_id: str
    at: float
    level: str  # INFO | WARN | ERROR | DEBUG
    message: str
    data: dict[str, Any] = field(default_factory=dict)


class CancelOutcome(enum.StrEnum):
    NOT_FOUND = "not_found"
    ALREADY_FINISHED = "already_finished"
    CANCELED = "canceled"  # was queued: finished at once
    REQUESTED = "requested"  # running: the worker stops within one step


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """Queued and running jobs of one endpoint and priority (for metrics)."""

    endpoint: str
    priority: int
    queued: int
    running: int


@dataclass(frozen=True, slots=True)
class PurgedJob:
    """A finished job removed by retention; its files are the caller's to delete."""

    id: str
    file_keys: list[str]


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One pending webhook: an outbox row claimed by one API process for a while."""

    id: int
    job_id: str
    url: str
    attempts: int
    next_attempt_at: float
