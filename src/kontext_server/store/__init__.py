"""Job stores. ``open_store(url)`` picks the backend from the URL's scheme."""

from __future__ import annotations

from kontext_server.errors import ConfigError
from kontext_server.store.base import JobStore

__all__ = ["JobStore", "open_store"]


def open_store(url: str) -> JobStore:
    """``sqlite:///abs/path.db`` (or ``sqlite:///:memory:`` for tests)."""
    if url.startswith("sqlite:///"):
        from kontext_server.store.sqlite import SQLiteJobStore

        return SQLiteJobStore(url.removeprefix("sqlite:///"))
    raise ConfigError(f"unsupported job store URL {url!r}: use sqlite:///path/to/jobs.db")
