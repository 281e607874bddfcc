"""Operations routes: ``/metrics`` (Prometheus), ``/healthz`` (alive), ``/readyz`` (ready)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kontext_server.logs import request_context
from kontext_server.metrics import CONTENT_TYPE, render_metrics
from kontext_server.store.base import JobStore

__all__ = ["AccessLogMiddleware", "ReadinessCheck", "ops_router"]

log = logging.getLogger("kontext_server.access")

# A check returns None when fine, else what is wrong (shown by /readyz).
ReadinessCheck = Callable[[], str | None]

_REQUEST_ID_IN_PATH = re.compile(r"/requests/([0-9a-fA-F-]{8,64})(?:/|$)")


def ops_router(
    store: JobStore, *, multiprocess_dir: Path | None, checks: list[ReadinessCheck]
) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    def readyz() -> JSONResponse:
        problems = [p for p in (_run_check(check) for check in [_store_check(store), *checks]) if p]
        if problems:
            body = {"status": "unavailable", "problems": problems}
            return JSONResponse(body, status_code=503, headers={"retry-after": "1"})
        return JSONResponse({"status": "ready"})

    @router.get("/metrics")
    async def metrics() -> Response:
        body = await run_in_threadpool(render_metrics, store, multiprocess_dir)
        return Response(body, media_type=CONTENT_TYPE)

    return router


def _store_check(store: JobStore) -> ReadinessCheck:
    def check() -> str | None:
        store.ping()  # a real round trip (queue depth and positions come from memory)
        return None

    return check


def _run_check(check: ReadinessCheck) -> str | None:
    try:
        return check()
    except Exception as exc:  # a failing dependency is an answer here, not a crash
        return f"{type(exc).__name__}: {exc}"


class AccessLogMiddleware:
    """One log line per request, carrying the request id (from the path or the answer).

    Pure ASGI (not ``BaseHTTPMiddleware``), so streaming answers and disconnect detection
    (a ``/run/`` caller hanging up cancels its request) pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        match = _REQUEST_ID_IN_PATH.search(path)
        request_id = match.group(1) if match else None
        status = 0
        started = time.perf_counter()

        async def send_and_note(message: Message) -> None:
            nonlocal status, request_id
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", []):
                    if name == b"x-fal-request-id":
                        request_id = value.decode("latin-1")
            await send(message)

        with request_context(request_id):
            try:
                await self.app(scope, receive, send_and_note)
            finally:
                log.info(
                    "%s %s %d %.1f ms",
                    scope["method"],
                    path,
                    status,
                    1000 * (time.perf_counter() - started),
                    extra={"request_id": request_id or "-"},
                )
