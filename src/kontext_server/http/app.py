"""``create_app``: the FastAPI application of the API process.

Routes (PROTOCOL.md §1): the queue API at ``/`` and ``/queue/``, sync runs at ``/run/``,
output files at ``/files/``, webhook keys at ``/.well-known/jwks.json``. While the app runs,
daemon threads work beside it: the queue maintenance loop (lost workers, start deadlines),
the retention cleanup (expired results and their files) and the webhook dispatcher (the
durable outbox). The API process never imports torch.
"""

from __future__ import annotations

import gc
import inspect
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from kontext_server import __version__
from kontext_server.config import Settings
from kontext_server.core.auth import Authenticator
from kontext_server.core.retention import CleanupLoop
from kontext_server.core.service import MaintenanceLoop, QueueService
from kontext_server.files.base import FileStore
from kontext_server.http.bfl_api import bfl_router
from kontext_server.http.context import ApiContext
from kontext_server.http.errors import install_exception_handlers
from kontext_server.http.fal import (
    QUEUE_PREFIXES,
    add_request_routes,
    add_submit_routes,
    add_unknown_endpoint_route,
    add_unknown_request_route,
    run_router,
)
from kontext_server.http.files import files_router
from kontext_server.http.openai_api import openai_router
from kontext_server.http.ops import AccessLogMiddleware, ReadinessCheck, ops_router
from kontext_server.http.playground import playground_router
from kontext_server.http.proxy import proxy_router
from kontext_server.http.storage import storage_router
from kontext_server.http.wellknown import wellknown_router
from kontext_server.net.fetch import SafeFetcher
from kontext_server.store.base import JobStore
from kontext_server.webhooks.delivery import WebhookDispatcher
from kontext_server.webhooks.signing import WebhookSigner

__all__ = [
    "CORS_ALLOWED_HEADERS",
    "NETWORK_STORE_SWITCH_INTERVAL_S",
    "WEBHOOK_KEY_FILE",
    "create_app",
    "tune_threads_for",
]

WEBHOOK_KEY_FILE = "webhook-ed25519.pem"  # under Settings.data_dir
# With a store that waits on the network, every status poll and submit batch runs its store
# call in a thread, which then waits for the GIL while the event loop holds it: up to
# Python's switch interval (5 ms) per hand-over, twice per call. 1 ms cut the status p50 on
# PostgreSQL from ~7 to ~3 ms and the p99 from ~46 to ~11-16 ms (docs/performance.md).
NETWORK_STORE_SWITCH_INTERVAL_S = 0.001
# Browsers may send these (PROTOCOL.md §1-§2); Starlette's CORS takes no wildcard patterns.
CORS_ALLOWED_HEADERS = [
    "authorization",
    "content-type",
    "accept",
    "idempotency-key",
    "x-fal-queue-priority",
    "x-fal-request-timeout",
    "x-fal-request-timeout-type",
    "x-fal-request-start-timeout",
    "x-fal-runner-hint",
    "x-fal-no-retry",
    "x-fal-object-lifecycle",
    "x-fal-object-lifecycle-preference",
    "x-fal-target-url",
    "x-fal-file-name",
    "x-fal-cdn-token",
    "x-fal-store-io",
    "x-key",  # BFL API
]
_NO_TELEMETRY = {"tracing": False, "metrics": False, "logs": False}
_WEBHOOK_RESPONSE_MAX_BYTES = 64 * 1024
_BASE64_SLACK = 1024  # room for "data:image/...;base64," around the encoded bytes


def tune_threads_for(store: JobStore) -> None:
    """Process-wide, for ``serve``'s API process: a shorter GIL switch interval
    (``NETWORK_STORE_SWITCH_INTERVAL_S``) where the store's calls run in threads (PostgreSQL);
    nothing for a local store, whose calls stay on the event loop."""
    if store.waits_on_network:
        sys.setswitchinterval(NETWORK_STORE_SWITCH_INTERVAL_S)


def create_app(
    settings: Settings,
    store: JobStore,
    files: FileStore,
    *,
    signer: WebhookSigner | None = None,
    fetcher: SafeFetcher | None = None,
    clock: Callable[[], float] = time.time,
    run_background: bool = True,
    maintenance_interval_s: float = 1.0,
    stream_keepalive_s: float = 15.0,
    poll_interval_s: float = 0.1,
    metrics_dir: Path | None = None,
    readiness_checks: Sequence[ReadinessCheck] = (),
    shutdown_hooks: Sequence[Callable[[], None]] = (),
    freeze_heap: bool = False,
) -> FastAPI:
    """The API over ``store`` and ``files``; the caller owns (and closes) both.

    ``signer`` defaults to the key in ``settings.data_dir`` (created on first use);
    ``fetcher`` (webhook delivery) to a ``SafeFetcher`` with the settings' allow-list.
    ``run_background=False`` starts none of the maintenance loop, the retention cleanup and
    the webhook dispatcher (tests that drive them by hand). ``metrics_dir`` is the
    prometheus_client multiprocess folder shared with this node's workers (None: this
    process's own metrics);
    ``readiness_checks`` are extra conditions for ``/readyz`` (e.g. a worker is alive);
    ``shutdown_hooks`` run when the app stops (``serve`` stops its workers there, because
    uvicorn re-raises SIGTERM once the app has stopped). ``freeze_heap=True`` (what ``serve``
    does) moves every object alive once the app has started out of the garbage collector's
    reach (``gc.freeze``): the app's own long-lived objects (routes, models, schemas) are
    then not traversed again by every full collection, which cost ~25 µs per submit
    (docs/performance.md). Leave it off where many apps come and go in one process (tests)."""
    signer = signer or WebhookSigner.load_or_create(settings.data_dir / WEBHOOK_KEY_FILE)
    service = QueueService(store, files, settings, clock=clock)
    context = ApiContext(
        settings=settings,
        service=service,
        files=files,
        authenticator=Authenticator.from_settings(store, settings),
        stream_keepalive_s=stream_keepalive_s,
        poll_interval_s=poll_interval_s,
        max_body_bytes=_max_body_bytes(settings),
        max_data_uri_bytes=settings.max_image_bytes,
        url_checker=_webhook_fetcher(settings),
    )
    background = _Background(
        MaintenanceLoop(store, interval_s=maintenance_interval_s),
        CleanupLoop(store, files, interval_s=settings.cleanup_interval_s),
        WebhookDispatcher(
            store,
            signer,
            fetcher or _webhook_fetcher(settings),
            service.webhook_payload,
            extra_headers_for=service.webhook_headers,
            claimer_id=f"api-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
            max_attempts=settings.webhook_max_attempts,
            clock=clock,
        ),
        enabled=run_background,
        shutdown_hooks=shutdown_hooks,
        freeze_heap=freeze_heap,
    )
    app = FastAPI(
        title="kontext-server",
        version=__version__,
        description="FLUX.1 Kontext editing behind fal.ai's queue API.",
        lifespan=background.lifespan,
        **_telemetry_options(settings),
    )
    app.state.context = context
    app.state.signer = signer
    _install_routes(
        app, ops_router(store, multiprocess_dir=metrics_dir, checks=[*readiness_checks])
    )
    install_exception_handlers(app)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["GET", "HEAD", "POST", "PUT", "OPTIONS"],
        allow_headers=CORS_ALLOWED_HEADERS,
        expose_headers=["x-fal-request-id", "x-fal-error-type", "x-fal-request-timeout-type"],
    )
    app.add_middleware(AccessLogMiddleware)
    return app


def _install_routes(app: FastAPI, ops: APIRouter) -> None:
    # Order matters. The queue routes come first: submits and status polls are most of the
    # traffic, and a route is found by trying each in turn. They shadow no other route: the
    # submit paths are exact and the request paths contain "/requests/". Request routes under
    # "/queue" before those under "": the bare ones would take "/queue/..." too. The catch-all
    # submits of unknown endpoints come last: they match every POST path.
    for prefix in ("", "/queue"):  # most clients submit without "/queue"
        add_submit_routes(app, prefix)
    for prefix in QUEUE_PREFIXES:
        add_request_routes(app, prefix)
    for prefix in QUEUE_PREFIXES:
        add_unknown_request_route(app, prefix)
    app.include_router(ops)
    app.include_router(files_router())
    app.include_router(wellknown_router())
    app.include_router(playground_router())
    app.include_router(storage_router(app.state.context))
    app.include_router(proxy_router())
    app.include_router(bfl_router())
    app.include_router(openai_router())
    app.include_router(run_router())
    for prefix in QUEUE_PREFIXES:
        add_unknown_endpoint_route(app, prefix)


def _telemetry_options(settings: Settings) -> dict[str, Any]:
    """FastAPI's native OpenTelemetry off unless ``KONTEXT_OPENTELEMETRY`` (FastAPI versions
    without it take no such option, and have nothing to turn off)."""
    if settings.opentelemetry or "telemetry" not in inspect.signature(FastAPI).parameters:
        return {}
    return {"telemetry": _NO_TELEMETRY}


def _max_body_bytes(settings: Settings) -> int:
    """Room for two inline images of the allowed size (base64: 4 bytes per 3); more images
    should be sent as URLs."""
    return 2 * (settings.max_image_bytes * 4 // 3 + _BASE64_SLACK) + 64 * 1024


def _webhook_fetcher(settings: Settings) -> SafeFetcher:
    return SafeFetcher(
        allow_hosts=settings.fetch_allow_hosts,
        allow_ports=settings.fetch_allow_ports,
        timeout_s=settings.webhook_timeout_s,
        max_bytes=_WEBHOOK_RESPONSE_MAX_BYTES,
        max_redirects=0,
    )


class _Background:
    """The maintenance loop, the retention cleanup and the webhook dispatcher, started and
    stopped with the app."""

    def __init__(
        self,
        maintenance: MaintenanceLoop,
        cleanup: CleanupLoop,
        dispatcher: WebhookDispatcher,
        *,
        enabled: bool,
        shutdown_hooks: Sequence[Callable[[], None]] = (),
        freeze_heap: bool = False,
    ) -> None:
        self._freeze_heap = freeze_heap
        self._shutdown_hooks = list(shutdown_hooks)
        self._maintenance = maintenance
        self._cleanup = cleanup
        self._dispatcher = dispatcher
        self._enabled = enabled
        self._stop = threading.Event()
        self._dispatcher_thread: threading.Thread | None = None

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.start()
        if self._freeze_heap:
            gc.collect()  # what is garbage now is freed, not frozen
            gc.freeze()
        try:
            yield
        finally:
            self.stop()
            for hook in self._shutdown_hooks:
                hook()

    def start(self) -> None:
        if not self._enabled:
            return
        self._stop.clear()
        self._maintenance.start()
        self._cleanup.start()
        self._dispatcher_thread = threading.Thread(
            target=self._dispatcher.run_forever, args=(self._stop,), name="webhooks", daemon=True
        )
        self._dispatcher_thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._maintenance.stop()
        self._cleanup.stop()
        if self._dispatcher_thread is not None:
            self._dispatcher_thread.join(10.0)
            self._dispatcher_thread = None
