"""Exceptions answered as HTTP: authentication (401/403), idempotency conflicts (409), a full
queue (429 with ``Retry-After`` in seconds), a job store that cannot be reached (503 with
``Retry-After``), and, as the last resort, anything unexpected (500 with a JSON body).

Validation errors keep FastAPI's own 422 answer (a ``detail`` list); the messages come from
``fal/schemas.py`` and ``fal/submission.py``.

The invariant these handlers help keep (docs/security.md): whatever arrives, the answer is
JSON, and a client's mistake is a 4xx that says what was wrong. A store outage is not the
client's mistake and not a bug: it is a 503 the client may retry.
"""

from __future__ import annotations

import logging
import sqlite3

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kontext_server.core.auth import AuthError
from kontext_server.core.service import IdempotencyConflictError, QueueFullError
from kontext_server.domain.errors import StoreUnavailableError

__all__ = ["STORE_RETRY_AFTER_S", "install_exception_handlers", "store_unavailable_response"]

log = logging.getLogger(__name__)

STORE_RETRY_AFTER_S = 1  # the store is probed again at once, so a retry may well work
_OPENAI_PREFIX = "/v1/images/"


def install_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AuthError, _auth_error)  # type: ignore[arg-type]
    app.add_exception_handler(IdempotencyConflictError, _idempotency_conflict)  # type: ignore[arg-type]
    app.add_exception_handler(QueueFullError, _queue_full)  # type: ignore[arg-type]
    app.add_exception_handler(StoreUnavailableError, _store_unavailable)
    # SQLite says "database is locked" (another process held the write lock past the busy
    # timeout) or cannot open its file: the same answer as an unreachable PostgreSQL.
    app.add_exception_handler(sqlite3.OperationalError, _store_unavailable)
    app.add_exception_handler(Exception, _unexpected)


async def _auth_error(request: Request, exc: AuthError) -> JSONResponse:
    headers = {"www-authenticate": "Key"} if exc.status_code == 401 else {}
    if exc.retry_after_s is not None:  # too many wrong keys from this client
        headers["retry-after"] = str(exc.retry_after_s)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


async def _idempotency_conflict(request: Request, exc: IdempotencyConflictError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=409)


async def _queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
    headers = {"retry-after": str(exc.retry_after_s)}
    return JSONResponse({"detail": str(exc)}, status_code=429, headers=headers)


def store_unavailable_response(path: str) -> JSONResponse:
    """503 + ``Retry-After``, in the fal shape or, under ``/v1/images/``, OpenAI's."""
    detail = (
        "The job store is unavailable; nothing was changed by this request. Retry in "
        f"{STORE_RETRY_AFTER_S} s"
    )
    headers = {"retry-after": str(STORE_RETRY_AFTER_S)}
    if path.startswith(_OPENAI_PREFIX):
        error = {"message": detail, "type": "server_error", "param": None, "code": None}
        return JSONResponse({"error": error}, status_code=503, headers=headers)
    return JSONResponse({"detail": detail}, status_code=503, headers=headers)


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("answered 503: %s", exc)
    return store_unavailable_response(request.scope.get("path", ""))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the exception (and re-raises it to the server) after this answer.
    return JSONResponse({"detail": "Internal server error"}, status_code=500)
