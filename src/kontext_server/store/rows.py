"""Rows to domain objects, and a job to the values of its insert: one copy for every backend.

Both backends hand these functions their rows as they come (``sqlite3.Row``, psycopg's
``dict_row``: read by column name) with JSON columns as their text (SQLite stores text;
PostgreSQL's connections load ``jsonb`` as text, see ``postgres.py``), so the JSON of a
stored job is decoded here and nowhere else. ``job_from_row`` is the one place a stored
``input`` becomes ``Job.input``, and ``job_insert_values`` the one place ``NewJob.input``
becomes what is stored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from kontext_server.domain.jobs import (
    ApiKey,
    Job,
    JobEvent,
    JobStatus,
    NewJob,
    Progress,
    PurgedJob,
    QueueDepth,
    WebhookDelivery,
)
from kontext_server.store.common import file_keys_of
from kontext_server.store.inputs import decode_input, encode_input

__all__ = [
    "Row",
    "api_key_from_row",
    "deliveries_from_rows",
    "dumps",
    "event_from_row",
    "job_from_row",
    "job_insert_values",
    "loads_or_none",
    "new_job",
    "purged_from_row",
    "queue_depth_from_row",
]


class Row(Protocol):
    """A result row read by column name (``sqlite3.Row``, psycopg's ``DictRow``)."""

    def __getitem__(self, key: str, /) -> Any: ...


def dumps(value: Any) -> str:
    """JSON text as SQLite stores it (compact, UTF-8 as is)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def loads_or_none(text: str | bytes | None) -> Any:
    """A nullable JSON column's value (``None`` for SQL ``NULL``)."""
    return None if text is None else json.loads(text)


def job_from_row(row: Row) -> Job:
    """A ``jobs`` row (``SELECT *`` or ``RETURNING *``) as a ``Job``."""
    step, total = row["progress_step"], row["progress_total"]
    edit, api, api_data = decode_input(json.loads(row["input"]))
    return Job(
        id=row["id"],
        seq=row["seq"],
        endpoint=row["endpoint"],
        input=edit,
        owner=row["owner"],
        priority=row["priority"],
        status=JobStatus(row["status"]),
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        cancel_requested=bool(row["cancel_requested"]),
        lease_owner=row["lease_owner"],
        lease_until=row["lease_until"],
        result=loads_or_none(row["result"]),
        error=row["error"],
        error_type=row["error_type"],
        progress=None if step is None or total is None else Progress(step=step, total=total),
        start_deadline_at=row["start_deadline_at"],
        webhook_url=row["webhook_url"],
        base_url=row["base_url"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        engine=row["engine"],
        upstream=loads_or_none(row["upstream"]),
        api=api,
        api_data=api_data,
    )


def job_insert_values(job: NewJob, now: float, to_json: Callable[[Any], Any]) -> tuple[Any, ...]:
    """The values of ``statements``' ``insert_job``, in its column order. ``to_json`` makes
    the driver's parameter of a JSON value (``dumps``; psycopg's ``Jsonb``)."""
    return (
        job.id,
        job.owner,
        job.endpoint,
        job.priority,
        job.max_attempts,
        to_json(encode_input(job.input, job.api, job.api_data)),
        job.start_deadline_at,
        job.webhook_url,
        job.base_url,
        job.idempotency_key,
        job.retention_s,
        now,
        job.engine,
    )


def new_job(job: NewJob, seq: int, created_at: float) -> Job:
    """The row an insert of ``job`` just made, without reading it back."""
    return Job(
        id=job.id,
        seq=seq,
        endpoint=job.endpoint,
        input=job.input,
        owner=job.owner,
        priority=job.priority,
        status=JobStatus.QUEUED,
        attempts=0,
        max_attempts=job.max_attempts,
        cancel_requested=False,
        lease_owner=None,
        lease_until=None,
        result=None,
        error=None,
        error_type=None,
        progress=None,
        start_deadline_at=job.start_deadline_at,
        webhook_url=job.webhook_url,
        base_url=job.base_url,
        created_at=created_at,
        engine=job.engine,
        api=job.api,
        api_data=job.api_data,
    )


def event_from_row(row: Row) -> JobEvent:
    return JobEvent(
        id=row["id"],
        job_id=row["job_id"],
        at=row["at"],
        level=row["level"],
        message=row["message"],
        data=json.loads(row["data"]),
    )


def api_key_from_row(row: Row) -> ApiKey:
    return ApiKey(
        id=row["id"], name=row["name"], created_at=row["created_at"], revoked_at=row["revoked_at"]
    )


def deliveries_from_rows(rows: Iterable[Row]) -> list[WebhookDelivery]:
    """Claimed outbox rows (id, job_id, url, attempts, next_attempt_at), due first."""
    deliveries = [
        WebhookDelivery(
            id=row["id"],
            job_id=row["job_id"],
            url=row["url"],
            attempts=row["attempts"],
            next_attempt_at=row["next_attempt_at"],
        )
        for row in rows
    ]
    return sorted(deliveries, key=lambda d: (d.next_attempt_at, d.id))


def queue_depth_from_row(row: Row) -> QueueDepth:
    return QueueDepth(
        endpoint=row["endpoint"],
        priority=row["priority"],
        queued=int(row["queued"]),
        running=int(row["running"]),
    )


def purged_from_row(row: Row) -> PurgedJob:
    """A deleted job (its id and result) with the file keys of its result."""
    return PurgedJob(id=row["id"], file_keys=file_keys_of(loads_or_none(row["result"])))
