"""File stores. ``open_file_store(url)`` picks the backend from the URL's scheme."""

from __future__ import annotations

from pathlib import Path

from kontext_server.errors import ConfigError
from kontext_server.files.base import FileStore, StoredFile

__all__ = ["FileStore", "StoredFile", "open_file_store"]


def open_file_store(url: str) -> FileStore:
    """``file:///abs/dir``."""
    if url.startswith("file://"):
        from kontext_server.files.local import LocalFileStore

        return LocalFileStore(Path(url.removeprefix("file://")))
    raise ConfigError(f"unsupported file store URL {url!r}: use file:///path/to/dir")
