"""File stores. ``open_file_store(url, settings)`` picks the backend from the URL's scheme."""

from __future__ import annotations

from pathlib import Path

from kontext_server.config import Settings
from kontext_server.domain.errors import ConfigError
from kontext_server.files.base import FileStore, StoredFile

__all__ = ["FileStore", "StoredFile", "open_file_store"]


def open_file_store(url: str, settings: Settings | None = None) -> FileStore:
    """``file:///abs/dir`` or ``s3://bucket/prefix``.

    An S3 store takes its endpoint, region, credentials, addressing style and link expiry
    from ``settings`` (``s3_*``; ``None``: ``Settings()``, i.e. the environment) and checks
    the bucket once (``ConfigError`` saying what to fix when it cannot be used)."""
    if url.startswith("file://"):
        from kontext_server.files.local import LocalFileStore

        return LocalFileStore(Path(url.removeprefix("file://")))
    if url.startswith("s3://"):
        from kontext_server.files.s3 import open_s3_file_store  # boto3 loads only when used

        return open_s3_file_store(url, settings if settings is not None else Settings())
    raise ConfigError(
        f"unsupported file store URL {url!r}: use file:///path/to/dir or s3://bucket/prefix"
    )
