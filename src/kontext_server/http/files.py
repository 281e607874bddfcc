"""``GET /files/{key}``: output images of a local file store, with their content type.

Keys are unguessable and never reused (they include the attempt), so files are public and
cacheable forever, like fal's CDN links. A store without local paths (S3 later) hands out its
own links and has nothing to serve here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from kontext_server.files.base import content_type_for_key, is_valid_file_key
from kontext_server.http.context import Context

__all__ = ["LocalPaths", "files_router"]

_CACHE_FOREVER = "public, max-age=31536000, immutable"


@runtime_checkable
class LocalPaths(Protocol):
    """A file store whose files are on this machine (``LocalFileStore``)."""

    def path(self, key: str) -> Path | None: ...


def files_router() -> APIRouter:
    router = APIRouter(tags=["files"])
    router.add_api_route("/files/{key:path}", serve_file, methods=["GET"])
    # HEAD as a route of its own, out of the schema: one route with both methods gave both
    # operations the same OpenAPI operation id.
    router.add_api_route("/files/{key:path}", serve_file, methods=["HEAD"], include_in_schema=False)
    return router


def serve_file(key: str, context: Context) -> FileResponse:
    """Stream one stored file; 404 for unknown keys (and for stores without local paths)."""
    path = _local_path(context, key) if is_valid_file_key(key) else None
    if path is None:
        raise HTTPException(404, "File not found")
    return FileResponse(
        path,
        media_type=content_type_for_key(key),
        headers={"cache-control": _CACHE_FOREVER, "x-content-type-options": "nosniff"},
    )


def _local_path(context: Context, key: str) -> Path | None:
    store = context.files
    if not isinstance(store, LocalPaths):
        return None
    try:
        path = store.path(key)
    except (ValueError, OSError):  # a key the store refuses (.., absolute, odd characters)
        return None
    return path if path is not None and path.is_file() else None
