"""The ``FileStore`` protocol: where output images live and how clients reach them."""

from __future__ import annotations

import mimetypes
import re
import secrets
from dataclasses import dataclass
from typing import Protocol

__all__ = ["FileStore", "StoredFile", "content_type_for_key", "is_valid_file_key", "new_file_key"]

# Slash-separated segments of letters, digits, ``-``, ``_`` and ``.``; no segment starts with
# a dot, so no ``.``/``..``, no hidden files, and no absolute paths (no leading slash).
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")
_MAX_KEY_CHARS = 512
_EXTENSION_PATTERN = re.compile(r"[a-z0-9]{1,8}")
_TOKEN_BYTES = 18  # 144 random bits: unguessable, and 24 URL-safe characters
_CONTENT_TYPES = {
    "jpeg": "image/jpeg",
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
}


@dataclass(frozen=True, slots=True)
class StoredFile:
    key: str  # unguessable, includes the job's attempt: never overwrites a published result
    size: int
    content_type: str


class FileStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> StoredFile: ...

    def url(self, key: str, base_url: str) -> str:
        """A link a client can GET. ``base_url`` is where the client reached this server."""
        ...

    def read(self, key: str) -> bytes | None: ...

    def delete(self, key: str) -> None: ...


def new_file_key(job_id: str, attempt: int, index: int, extension: str) -> str:
    """A fresh, unguessable key for output ``index`` of a job's ``attempt``, e.g.
    ``"hTq0...Zk/2-0.jpeg"``. The attempt is part of the name, so a duplicate run never
    overwrites a published result; the job id is *not* (a shared image link must not reveal
    the request id). ``extension`` has no dot: ``jpeg``, ``png``, ``webp``."""
    if not _EXTENSION_PATTERN.fullmatch(extension):
        raise ValueError(f"file extension {extension!r} must be 1-8 lowercase letters or digits")
    if attempt < 1 or index < 0:
        raise ValueError(f"attempt starts at 1 and index at 0 (job {job_id}: {attempt}, {index})")
    return f"{secrets.token_urlsafe(_TOKEN_BYTES)}/{attempt}-{index}.{extension}"


def is_valid_file_key(key: str) -> bool:
    """Whether ``key`` is safe to use as a relative path: letters, digits, ``-_.`` in
    ``/``-separated segments that do not start with a dot; at most 512 characters."""
    return len(key) <= _MAX_KEY_CHARS and _KEY_PATTERN.fullmatch(key) is not None


def content_type_for_key(key: str) -> str:
    """The content type a file is served with, from its extension."""
    extension = key.rsplit(".", 1)[-1].lower() if "." in key.rsplit("/", 1)[-1] else ""
    return (
        _CONTENT_TYPES.get(extension)
        or mimetypes.guess_type(key.rsplit("/", 1)[-1])[0]
        or "application/octet-stream"
    )
