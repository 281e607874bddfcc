"""What every route needs (the service, the authenticator, limits) and the FastAPI
dependencies that hand it out. ``build_app`` puts one ``ApiContext`` on ``app.state``."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, ParamSpec, TypeVar, cast

from fastapi import Depends, Request

from kontext_server.config import Settings
from kontext_server.core.auth import Authenticator, Principal
from kontext_server.core.service import QueueService
from kontext_server.files.base import FileStore
from kontext_server.http.streams import StreamSlots
from kontext_server.net.fetch import SafeFetcher

__all__ = [
    "ApiContext",
    "Caller",
    "Context",
    "api_context",
    "authenticate",
    "caller",
    "site_base",
]


_SITE_BASE_KEY = "kontext.site_base"
P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class ApiContext:
    settings: Settings
    service: QueueService
    files: FileStore
    authenticator: Authenticator
    stream_keepalive_s: float  # SSE comment line when nothing else was sent for this long
    poll_interval_s: float  # how often streams and sync runs re-read the store
    max_body_bytes: int
    max_data_uri_bytes: int  # decoded size of one data: URI image
    stream_slots: StreamSlots = field(default_factory=StreamSlots)  # open SSE streams per key
    url_checker: SafeFetcher | None = None  # submit-time URL policy (same lists as fetching)
    # Where store calls wait for the network: one thread per pooled connection (more would
    # only wait for a connection; the loop's default executor has cpus + 4 threads).
    store_threads: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(thread_name_prefix="kontext-store")
    )

    async def store_call(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``call(...)``, a call that uses the job store: on the event loop where the store
        answers locally (SQLite: microseconds, less than a thread hop), in the thread pool
        where it waits on the network (PostgreSQL), so that the loop serves others
        meanwhile: ``store_threads``, with this request's context variables (its id in log
        lines). Not ``run_in_threadpool``: anyio's hop cost ~85 us of CPU per call against
        ~45 us, a tenth of a status poll."""
        if self.service.store.waits_on_network:
            bound = functools.partial(contextvars.copy_context().run, call, *args, **kwargs)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.store_threads, bound)
        return call(*args, **kwargs)


async def api_context(request: Request) -> ApiContext:
    return cast(ApiContext, request.app.state.context)


Context = Annotated[ApiContext, Depends(api_context)]


async def caller(request: Request, context: Context) -> Principal:
    """Authenticates the request (raises ``AuthError``, answered 401/403)."""
    client_host = request.client.host if request.client else None
    authorization = request.headers.get("authorization")
    known = context.authenticator.authenticate_from_cache(authorization, client_host)
    if known is not None:  # no store call needed: no thread hop either
        return known
    authenticate = context.authenticator.authenticate
    return await context.store_call(authenticate, authorization, client_host)


Caller = Annotated[Principal, Depends(caller)]


def authenticate(context: ApiContext, request: Request, key: str | None) -> Principal:
    """The caller of a request that sends its API key as ``key`` (e.g. BFL's ``x-key``); with
    no such key, the ``Authorization`` header counts. Raises ``AuthError`` (401/403) with the
    same rules as the fal routes (auth off: loopback only, unless ``insecure_no_auth``)."""
    client_host = request.client.host if request.client else None
    authorization = f"Key {key.strip()}" if key and key.strip() else None
    authorization = authorization or request.headers.get("authorization")
    return context.authenticator.authenticate(authorization, client_host)


def site_base(request: Request) -> str:
    """Scheme, host and root path the client used to reach this server (no trailing slash).
    Kept in the request's scope: a submit needs it three times."""
    base = request.scope.get(_SITE_BASE_KEY)
    if base is None:
        base = request.scope[_SITE_BASE_KEY] = str(request.base_url).rstrip("/")
    return cast(str, base)
