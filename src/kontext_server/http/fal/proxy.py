"""``/proxy``: the JS client's proxy mode (PROTOCOL.md §1), served in-process.

``createFalClient({proxyUrl: {url: "<server>/proxy", when: "always"}})`` sends every call
(any method, its body and headers unchanged) to that one URL, with the fal URL it meant in
the header ``x-fal-target-url``. This route maps the fal host to our own prefix and
dispatches the rewritten request to this app's routes, in the same process (no outbound
HTTP, so no SSRF surface):

================================  ===============
``https://queue.fal.run/...``     ``/...`` (queue)
``https://fal.run/...``           ``/run/...``
``https://rest.fal.ai/...``       ``/rest/...``
``https://<name>.fal.media/...``  ``/cdn/...``
================================  ===============

Any other target is answered 400 with what is allowed. The JS client sends its upload
``PUT`` straight to the ``upload_url`` we hand out, so that one never passes through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from fastapi import APIRouter
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = ["PROXY_PATH", "TARGET_URL_HEADER", "ProxyTargetError", "proxy_router", "route_target"]

PROXY_PATH = "/proxy"
TARGET_URL_HEADER = "x-fal-target-url"
_HOST_PREFIXES = {
    "queue.fal.run": "",
    "queue.falrun.com": "",  # fal's backup domains
    "fal.run": "/run",
    "falrun.com": "/run",
    "rest.fal.ai": "/rest",
}
_MEDIA_SUFFIX = ".fal.media"
_MEDIA_PREFIX = "/cdn"
_ALLOWED = "https://queue.fal.run/..., https://fal.run/..., https://rest.fal.ai/... or https://*.fal.media/..."


class ProxyTargetError(ValueError):
    """An ``x-fal-target-url`` this server does not serve; the message says what is allowed."""


@dataclass(frozen=True, slots=True)
class ProxyTarget:
    path: str  # percent-encoded, relative to this app's root
    query: str


def route_target(target_url: str | None) -> ProxyTarget:
    """Our own path and query for a fal URL; ``ProxyTargetError`` for anything else."""
    if not target_url:
        raise ProxyTargetError(f"Missing header {TARGET_URL_HEADER}: the fal URL ({_ALLOWED})")
    parts = urlsplit(target_url)
    host = (parts.hostname or "").lower()
    prefix = _HOST_PREFIXES.get(host)
    if prefix is None and host.endswith(_MEDIA_SUFFIX):
        prefix = _MEDIA_PREFIX
    if parts.scheme not in ("https", "http") or prefix is None or parts.port or parts.username:
        raise ProxyTargetError(
            f"{TARGET_URL_HEADER} {target_url!r} is not a fal URL this server answers: "
            f"use {_ALLOWED}"
        )
    path = prefix + (parts.path or "/")
    _check_path(path, target_url)
    return ProxyTarget(path=path, query=parts.query)


def _check_path(path: str, target_url: str) -> None:
    segments = unquote(path).split("/")
    if any(segment in (".", "..") for segment in segments) or "\\" in unquote(path):
        raise ProxyTargetError(f"{TARGET_URL_HEADER} {target_url!r} has '.' or '..' segments")
    if path == PROXY_PATH or path.startswith(PROXY_PATH + "/"):
        raise ProxyTargetError(f"{TARGET_URL_HEADER} {target_url!r} points at the proxy itself")


def proxy_router() -> APIRouter:
    """``/proxy`` for every method. Register it before the queue routes (a catch-all)."""
    router = APIRouter(tags=["proxy"])
    # A plain Starlette route: its endpoint is an ASGI app, and no methods means every method.
    router.routes.append(Route(PROXY_PATH, FalProxy(), methods=None, include_in_schema=False))
    return router


class FalProxy:
    """An ASGI endpoint: rewrites the request's path and query from ``x-fal-target-url`` and
    hands it to the app's router, which answers as if the client had called that route (the
    response, streams included, goes straight back). The app's middleware (CORS, logs) and
    exception handlers already wrap this call, so they apply once."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            target = route_target(Headers(scope=scope).get(TARGET_URL_HEADER))
        except ProxyTargetError as exc:
            await JSONResponse({"detail": str(exc)}, status_code=400)(scope, receive, send)
            return
        root_path = scope.get("root_path", "")
        inner = dict(scope)
        inner["path"] = root_path + unquote(target.path)
        inner["raw_path"] = (root_path + target.path).encode()
        inner["query_string"] = target.query.encode()
        await scope["app"].router(inner, receive, send)
