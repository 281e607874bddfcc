"""The FastAPI application of the API process: ``build_app`` over ``ApiServices``, and
``create_app``, which builds the services from the settings and the stores first.

Routes (PROTOCOL.md §1): the queue API at ``/`` and ``/queue/``, sync runs at ``/run/``,
output files at ``/files/``, webhook keys at ``/.well-known/jwks.json``, BFL's and OpenAI's
APIs under ``/v1/``. While the app runs, the daemon threads of ``http/background.py`` work
beside it. The API process never imports torch.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypedDict, Unpack

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from kontext_server import __version__
from kontext_server.config import Settings
from kontext_server.files.base import FileStore
from kontext_server.http.background import Background
from kontext_server.http.bfl.routes import bfl_router
from kontext_server.http.context import ApiContext
from kontext_server.http.errors import install_exception_handlers
from kontext_server.http.fal.proxy import proxy_router
from kontext_server.http.fal.routes import (
    QUEUE_PREFIXES,
    add_request_routes,
    add_submit_routes,
    add_unknown_endpoint_route,
    add_unknown_request_route,
    run_router,
)
from kontext_server.http.fal.storage import storage_router
from kontext_server.http.files import files_router
from kontext_server.http.openai.routes import openai_router
from kontext_server.http.ops import AccessLogMiddleware, ReadinessCheck, ops_router
from kontext_server.http.playground import playground_router
from kontext_server.http.services import ApiServices
from kontext_server.http.wellknown import wellknown_router
from kontext_server.net.fetch import SafeFetcher
from kontext_server.store.base import JobStore
from kontext_server.webhooks.signing import WebhookSigner

__all__ = [
    "CORS_ALLOWED_HEADERS",
    "NETWORK_STORE_SWITCH_INTERVAL_S",
    "AppOptions",
    "build_app",
    "create_app",
    "tune_threads_for",
]

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
_BASE64_SLACK = 1024  # room for "data:image/...;base64," around the encoded bytes


class AppOptions(TypedDict, total=False):
    """``build_app``'s options.

    ``run_background=False`` (default ``True``) starts none of the maintenance loop (every
    ``maintenance_interval_s``, default 1 s), the retention cleanup and the webhook
    dispatcher (tests that drive them by hand). Status streams send a keep-alive comment
    after ``stream_keepalive_s`` (15 s) of silence; streams and sync runs re-read the store
    every ``poll_interval_s`` (0.1 s). ``metrics_dir`` is the prometheus_client
    multiprocess folder shared with this node's workers (None: this process's own metrics);
    ``readiness_checks`` are extra conditions for ``/readyz`` (e.g. a worker is alive);
    ``shutdown_hooks`` run when the app stops (``serve`` stops its workers there, because
    uvicorn re-raises SIGTERM once the app has stopped). ``freeze_heap=True`` (what ``serve``
    does) moves every object alive once the app has started out of the garbage collector's
    reach (``gc.freeze``): the app's own long-lived objects (routes, models, schemas) are
    then not traversed again by every full collection, which cost ~25 µs per submit
    (docs/performance.md). Leave it off where many apps come and go in one process (tests).
    """

    run_background: bool
    maintenance_interval_s: float
    stream_keepalive_s: float
    poll_interval_s: float
    metrics_dir: Path | None
    readiness_checks: Sequence[ReadinessCheck]
    shutdown_hooks: Sequence[Callable[[], None]]
    freeze_heap: bool


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
    **options: Unpack[AppOptions],
) -> FastAPI:
    """The API over ``store`` and ``files``; the caller owns (and closes) both.
    ``signer``, ``fetcher`` and ``clock``: ``ApiServices.build``; the rest: ``AppOptions``."""
    services = ApiServices.build(
        settings, store, files, signer=signer, fetcher=fetcher, clock=clock
    )
    return build_app(services, **options)


def build_app(services: ApiServices, **options: Unpack[AppOptions]) -> FastAPI:
    """The API over ``services`` (see ``AppOptions``)."""
    background = Background.for_services(
        services,
        enabled=options.get("run_background", True),
        maintenance_interval_s=options.get("maintenance_interval_s", 1.0),
        shutdown_hooks=options.get("shutdown_hooks", ()),
        freeze_heap=options.get("freeze_heap", False),
    )
    app = FastAPI(
        title="kontext-server",
        version=__version__,
        description="FLUX.1 Kontext editing behind fal.ai's queue API.",
        lifespan=background.lifespan,
        **_telemetry_options(services.settings),
    )
    app.state.services = services
    app.state.context = _context(services, options)
    checks = [*options.get("readiness_checks", ())]
    ops = ops_router(services.store, multiprocess_dir=options.get("metrics_dir"), checks=checks)
    _install_routes(app, ops)
    install_exception_handlers(app)
    _add_middleware(app)
    return app


def _context(services: ApiServices, options: AppOptions) -> ApiContext:
    settings = services.settings
    return ApiContext(
        settings=settings,
        service=services.queue,
        files=services.files,
        authenticator=services.authenticator,
        stream_keepalive_s=options.get("stream_keepalive_s", 15.0),
        poll_interval_s=options.get("poll_interval_s", 0.1),
        max_body_bytes=_max_body_bytes(settings),
        max_data_uri_bytes=settings.max_image_bytes,
        url_checker=services.url_checker,
        store_threads=ThreadPoolExecutor(
            max_workers=settings.pg_pool_max, thread_name_prefix="kontext-store"
        ),
    )


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


def _add_middleware(app: FastAPI) -> None:
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["GET", "HEAD", "POST", "PUT", "OPTIONS"],
        allow_headers=CORS_ALLOWED_HEADERS,
        expose_headers=["x-fal-request-id", "x-fal-error-type", "x-fal-request-timeout-type"],
    )
    app.add_middleware(AccessLogMiddleware)


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
