"""The SQL both backends run, written once with SQLite's ``?`` placeholders.

``QMARK`` holds the statements as written (SQLite's ``qmark`` style); ``PYFORMAT`` holds
the same statements in psycopg's ``%s`` style (PostgreSQL), converted once at import, so
no call pays for the conversion. A statement that differs in more than its placeholders
(row locks, CTEs, aggregates, collations) lives in its backend's module.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

__all__ = ["FENCE", "PYFORMAT", "QMARK", "Statements", "pyformat"]

# A worker's write applies only while the job is still its own: (job_id, worker_id, attempt).
FENCE = "id = ? AND status = 'running' AND lease_owner = ? AND attempts = ?"


@dataclass(frozen=True, slots=True)
class Statements:
    """One backend's copy of the shared statements (parameters in the order written)."""

    job_by_id: str  # (job_id)
    job_place_by_id: str  # (job_id): status, engine, priority, seq
    job_by_idempotency_key: str  # (owner or '', idempotency_key)
    insert_job: str  # rows.job_insert_values(...); no RETURNING (each backend adds its own)
    cancel_requested: str  # (job_id)
    request_cancel: str  # (job_id)
    peek_queued: str  # (engine, now, limit)
    events_after: str  # (job_id, after_id, limit)
    heartbeat: str  # (lease_until, *fence)
    set_upstream: str  # (upstream JSON, *fence)
    webhook_delivered: str  # (now, delivery_id)
    webhook_retry: str  # (next_attempt_at, error, delivery_id)
    webhook_give_up: str  # (now, error, delivery_id)
    insert_api_key: str  # (key_id, name, key_hash, now) RETURNING *
    active_api_key: str  # (key_hash)
    revoke_api_key: str  # (now, key_id)
    any_active_api_key: str  # (): column "any"
    schema_version: str  # (): column "version"
    insert_schema_version: str  # (version, now)


def pyformat(sql: str) -> str:
    """``sql`` in psycopg's placeholder style: ``?`` -> ``%s``, a literal ``%`` -> ``%%``.
    (No shared statement has a ``?`` inside a string literal.)"""
    return sql.replace("%", "%%").replace("?", "%s")


QMARK = Statements(
    job_by_id="SELECT * FROM jobs WHERE id = ?",
    job_place_by_id="SELECT status, engine, priority, seq FROM jobs WHERE id = ?",
    job_by_idempotency_key=(
        "SELECT * FROM jobs WHERE coalesce(owner, '') = ? AND idempotency_key = ?"
    ),
    insert_job=(
        "INSERT INTO jobs (id, owner, endpoint, priority, status, max_attempts,"
        " input, start_deadline_at, webhook_url, base_url, idempotency_key,"
        " retention_s, created_at, engine)"
        " VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    ),
    cancel_requested="SELECT cancel_requested FROM jobs WHERE id = ?",
    request_cancel="UPDATE jobs SET cancel_requested = true WHERE id = ?",
    peek_queued=(
        "SELECT * FROM jobs WHERE status = 'queued' AND engine = ?"
        " AND (start_deadline_at IS NULL OR start_deadline_at >= ?)"
        " ORDER BY priority, seq LIMIT ?"
    ),
    events_after="SELECT * FROM job_events WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?",
    heartbeat=f"UPDATE jobs SET lease_until = ? WHERE {FENCE}",
    set_upstream=f"UPDATE jobs SET upstream = ? WHERE {FENCE}",
    webhook_delivered=(
        "UPDATE webhook_outbox SET delivered_at = ?, attempts = attempts + 1,"
        " claimed_by = NULL, claimed_until = NULL WHERE id = ?"
    ),
    webhook_retry=(
        "UPDATE webhook_outbox SET attempts = attempts + 1, next_attempt_at = ?,"
        " last_error = ?, claimed_by = NULL, claimed_until = NULL WHERE id = ?"
    ),
    webhook_give_up=(
        "UPDATE webhook_outbox SET attempts = attempts + 1, gave_up_at = ?, last_error = ?,"
        " claimed_by = NULL, claimed_until = NULL WHERE id = ?"
    ),
    insert_api_key=(
        "INSERT INTO api_keys (id, name, key_hash, created_at) VALUES (?, ?, ?, ?) RETURNING *"
    ),
    active_api_key="SELECT * FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
    revoke_api_key="UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
    any_active_api_key="SELECT EXISTS (SELECT 1 FROM api_keys WHERE revoked_at IS NULL) AS any",
    schema_version="SELECT coalesce(max(version), 0) AS version FROM schema_version",
    insert_schema_version="INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
)
PYFORMAT = Statements(*(pyformat(sql) for sql in astuple(QMARK)))
