"""Exceptions answered as HTTP: authentication (401/403), idempotency conflicts (409) and a
full queue (429 with ``Retry-After`` in seconds).

Validation errors keep FastAPI's own 422 answer (a ``detail`` list); the messages come from
``schemas.py`` and ``submission.py``.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kontext_server.auth import AuthError
from kontext_server.service import IdempotencyConflictError, QueueFullError

__all__ = ["install_exception_handlers"]


def install_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AuthError, _auth_error)  # type: ignore[arg-type]
    app.add_exception_handler(IdempotencyConflictError, _idempotency_conflict)  # type: ignore[arg-type]
    app.add_exception_handler(QueueFullError, _queue_full)  # type: ignore[arg-type]


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
