"""The playground: a page to try the editing endpoints in a browser, served by the API itself.

Routes: ``GET /`` answers the page to browsers (``Accept: text/html``) and a small JSON index
with links to everything else; ``GET /playground`` is the page; ``GET /playground/config.json``
tells the page the rules it shows (endpoints, aspect ratios, limits, whether a key is needed);
``GET /playground/{asset}`` serves the plain files of ``http/static/`` (no build step).

The page only speaks the public API (submit, status stream, result, cancel, uploads), like any
other client of the same origin, so it needs nothing the API does not already offer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from kontext_server import __version__
from kontext_server.http.context import Context, site_base
from kontext_server.http.fal.schemas import (
    ASPECT_RATIOS,
    ENDPOINTS,
    MAX_IMAGE_URLS,
    PROMPT_MAX_CHARS,
)

__all__ = ["PAGE_ENDPOINTS", "STATIC_DIR", "playground_router"]

STATIC_DIR = Path(__file__).parent / "static"
# The endpoints the page offers, with the label shown to the user, in this order.
PAGE_ENDPOINTS = {
    "fal-ai/flux-pro/kontext/max": "Kontext Max",
    "fal-ai/flux-pro/kontext/max/multi": "Kontext Max Multi",
}
_PAGE = "index.html"
_ASSET_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page loads only its own files; images and uploads may live on another host (S3).
_PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data: blob: http: https:; connect-src 'self' http: https:; "
    "frame-ancestors 'none'; base-uri 'self'; form-action 'self'; object-src 'none'"
)
# Revalidate every time (cheap: ETag), so a server upgrade never runs a stale script.
_REVALIDATE = "no-cache"


def playground_router() -> APIRouter:
    """Routes of the page; include before the queue routes (they end in catch-alls)."""
    router = APIRouter(include_in_schema=False)
    router.add_api_route("/", root, methods=["GET", "HEAD"])
    router.add_api_route("/playground", page, methods=["GET", "HEAD"])
    # The page's links are relative to /playground: send /playground/ there.
    router.add_api_route("/playground/", to_page, methods=["GET", "HEAD"])
    router.add_api_route("/playground/config.json", page_config, methods=["GET"])
    router.add_api_route("/playground/{asset}", asset, methods=["GET", "HEAD"])
    return router


def root(request: Request) -> Response:
    """The page for browsers; for other clients, JSON links to the page, docs and endpoints."""
    # One URL, two answers: caches must key on Accept.
    if _wants_html(request.headers.get("accept", "")):
        html = page()
        html.headers["vary"] = "Accept"
        return html
    base = site_base(request)
    return JSONResponse(
        {
            "name": "kontext-server",
            "version": __version__,
            "playground": f"{base}/playground",
            "docs": f"{base}/docs",
            "openapi": f"{base}/openapi.json",
            "health": f"{base}/healthz",
            "endpoints": {endpoint: f"{base}/{endpoint}" for endpoint in ENDPOINTS},
        },
        headers={"vary": "Accept"},
    )


def page() -> FileResponse:
    """The playground's HTML."""
    response = _static_file(_PAGE, "text/html; charset=utf-8")
    response.headers["content-security-policy"] = _PAGE_CSP
    response.headers["referrer-policy"] = "same-origin"
    return response


def to_page(request: Request) -> RedirectResponse:
    return RedirectResponse(str(request.url.replace(path=request.url.path.rstrip("/"))))


async def page_config(context: Context) -> dict[str, Any]:
    """What the page shows and checks: the endpoints, the field rules, the server's limits."""
    auth_required = await run_in_threadpool(context.service.store.has_api_keys)
    return {
        "version": __version__,
        "endpoints": [_endpoint_entry(endpoint, label) for endpoint, label in _page_endpoints()],
        "aspect_ratios": list(ASPECT_RATIOS),
        "aspect_ratio_range": ["21:9", "9:21"],
        "max_image_urls": MAX_IMAGE_URLS,
        "max_image_bytes": context.settings.max_image_bytes,
        "prompt_max_chars": PROMPT_MAX_CHARS,
        "auth_required": auth_required,
    }


def asset(asset: str) -> FileResponse:
    """One of the page's scripts or stylesheets; 404 for anything else."""
    media_type = _ASSET_TYPES.get(Path(asset).suffix)
    if media_type is None or asset == _PAGE:
        raise HTTPException(404, "Not found")
    return _static_file(asset, media_type)


def _page_endpoints() -> list[tuple[str, str]]:
    offered = PAGE_ENDPOINTS.items()
    return [(endpoint, label) for endpoint, label in offered if endpoint in ENDPOINTS]


def _endpoint_entry(endpoint: str, label: str) -> dict[str, Any]:
    fields = ENDPOINTS[endpoint].model_fields
    return {
        "id": endpoint,
        "label": label,
        "image_field": "image_urls" if "image_urls" in fields else "image_url",
        # /max takes any ratio in range, /multi only the listed ones.
        "aspect_ratio": "enum" if "image_urls" in fields else "ratio",
    }


def _static_file(name: str, media_type: str) -> FileResponse:
    # Only plain names of files that exist in the folder: no way out of it.
    path = STATIC_DIR / name
    if "/" in name or "\\" in name or name.startswith(".") or not path.is_file():
        raise HTTPException(404, "Not found")
    return FileResponse(
        path,
        media_type=media_type,
        headers={"cache-control": _REVALIDATE, "x-content-type-options": "nosniff"},
    )


def _wants_html(accept: str) -> bool:
    """Whether the client prefers a page: browsers list text/html, API clients do not."""
    return "text/html" in accept.lower()
