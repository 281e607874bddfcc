"""What every job-store backend shares: error texts, event texts, retention defaults.

Backends differ in dialect only; the words a client sees (errors, log lines) and the
retention rules live here so that SQLite and PostgreSQL cannot drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kontext_server.domain.errors import ConfigError, StoreError
from kontext_server.domain.jobs import JobStatus

__all__ = [
    "API_KEYS_CACHE_S",
    "CANCELLED_ERROR",
    "CANCELLED_ERROR_TYPE",
    "DEFAULT_RETENTION_S",
    "RELEASED_EVENT",
    "START_TIMEOUT_ERROR",
    "START_TIMEOUT_ERROR_TYPE",
    "WORKER_LOST_ERROR",
    "WORKER_LOST_ERROR_TYPE",
    "KeysPresence",
    "check_retention_s",
    "file_keys_of",
    "final_event",
    "finish_error",
]

# How long has_api_keys() trusts its last answer. Authentication asks on every request (~3 % of
# the API's CPU under submits on SQLite, a round trip on PostgreSQL); keys created or revoked
# through the same store object take effect at once, through another process (`kontext-server
# keys`) within this many seconds.
API_KEYS_CACHE_S = 1.0


class KeysPresence:
    """``has_api_keys``'s answer, trusted for ``API_KEYS_CACHE_S`` (monotonic time, not the
    store's clock) and forgotten when this store object creates or revokes a key."""

    def __init__(self) -> None:
        self._known: tuple[float, bool] | None = None  # (time.monotonic(), answer)

    def answer(self, ask: Callable[[], bool]) -> bool:
        known, now = self._known, time.monotonic()
        if known is not None and now - known[0] < API_KEYS_CACHE_S:
            return known[1]
        answer = ask()
        self._known = (now, answer)
        return answer

    def known(self) -> bool | None:
        """The answer while it is trusted, else ``None`` (``answer`` would ask)."""
        known = self._known
        if known is None or time.monotonic() - known[0] >= API_KEYS_CACHE_S:
            return None
        return known[1]

    def forget(self) -> None:
        self._known = None


CANCELLED_ERROR = "Request cancelled"
CANCELLED_ERROR_TYPE = "client_cancelled"
START_TIMEOUT_ERROR = "Request timed out: no worker started it before its start deadline"
START_TIMEOUT_ERROR_TYPE = "request_timeout"
WORKER_LOST_ERROR = "The worker running this request was lost and no attempts are left"
WORKER_LOST_ERROR_TYPE = "runner_disconnected"
RELEASED_EVENT = "handed back (worker draining)"

DEFAULT_RETENTION_S = 30 * 24 * 3600.0  # fal keeps payloads 30 days


def finish_error(
    status: JobStatus, error: str | None, error_type: str | None
) -> tuple[str | None, str | None]:
    """``finish``'s (error, error_type) for ``status``; ``StoreError`` unless it is final. A
    ``canceled`` finish without an error gets fal's ``Request cancelled`` /
    ``client_cancelled``."""
    if not status.is_final:
        finals = ", ".join(s.value for s in JobStatus if s.is_final)
        raise StoreError(f"finish needs a final status ({finals}), not {status}")
    if status is JobStatus.CANCELED and error is None:
        return CANCELLED_ERROR, error_type or CANCELLED_ERROR_TYPE
    return error, error_type


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
