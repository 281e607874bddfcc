"""What every job-store backend shares: error texts, event texts, retention defaults.

Backends differ in dialect only; the words a client sees (errors, log lines) and the
retention rules live here so that SQLite and PostgreSQL cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from kontext_server.errors import ConfigError
from kontext_server.jobs import JobStatus

__all__ = [
    "CANCELLED_ERROR",
    "CANCELLED_ERROR_TYPE",
    "DEFAULT_RETENTION_S",
    "RELEASED_EVENT",
    "START_TIMEOUT_ERROR",
    "START_TIMEOUT_ERROR_TYPE",
    "WORKER_LOST_ERROR",
    "WORKER_LOST_ERROR_TYPE",
    "check_retention_s",
    "file_keys_of",
    "final_event",
]

CANCELLED_ERROR = "Request cancelled"
CANCELLED_ERROR_TYPE = "client_cancelled"
START_TIMEOUT_ERROR = "Request timed out: no worker started it before its start deadline"
START_TIMEOUT_ERROR_TYPE = "request_timeout"
WORKER_LOST_ERROR = "The worker running this request was lost and no attempts are left"
WORKER_LOST_ERROR_TYPE = "runner_disconnected"
RELEASED_EVENT = "handed back (worker draining)"

DEFAULT_RETENTION_S = 30 * 24 * 3600.0  # fal keeps payloads 30 days


def final_event(status: JobStatus, error: str | None) -> tuple[str, str]:
    """(level, message) of the event that closes a job's log."""
    if status is JobStatus.SUCCEEDED:
        return "INFO", "completed"
    if status is JobStatus.CANCELED:
        return "WARN", "canceled"
    return "ERROR", f"failed: {error}" if error else "failed"


def file_keys_of(result: Any) -> list[str]:
    """The file-store keys of a result: ``result["images"][i]["file_key"]``, nulls skipped.
    Tolerates any shape (a failed job has no result; old results may lack keys)."""
    if not isinstance(result, dict):
        return []
    images = result.get("images")
    if not isinstance(images, list):
        return []
    keys = []
    for image in images:
        key = image.get("file_key") if isinstance(image, dict) else None
        if isinstance(key, str) and key:
            keys.append(key)
    return keys


def check_retention_s(retention_s: float, what: str) -> float:
    """``retention_s`` if it is a positive number of seconds, else ``ConfigError``."""
    if not retention_s > 0:
        raise ConfigError(f"{what} must be a positive number of seconds, not {retention_s!r}")
    return float(retention_s)
