"""Job stores. ``open_store(url)`` picks the backend from the URL's scheme."""

from __future__ import annotations

from kontext_server.config import Settings
from kontext_server.domain.errors import ConfigError
from kontext_server.store.base import JobStore
from kontext_server.store.common import DEFAULT_RETENTION_S

__all__ = ["JobStore", "open_configured_store", "open_store"]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(
    url: str,
    *,
    default_retention_s: float = DEFAULT_RETENTION_S,
    pg_pool_max: int = 10,
    sqlite_work_poll_s: float = 0.02,
) -> JobStore:
    """``sqlite:///abs/path.db`` (or ``sqlite:///:memory:`` for tests), or a PostgreSQL URL
    ``postgresql://user:password@host:5432/dbname`` (``postgres://`` too; libpq query
    parameters such as ``?host=/run/postgresql`` or ``sslmode=require`` pass through).
    ``default_retention_s``: how long finished jobs are kept unless a job says otherwise."""
    if url.startswith("sqlite:///"):
        from kontext_server.store.sqlite import SQLiteJobStore

        return SQLiteJobStore(
            url.removeprefix("sqlite:///"),
            default_retention_s=default_retention_s,
            work_poll_s=sqlite_work_poll_s,
        )
    if url.startswith(POSTGRES_SCHEMES):
        from kontext_server.store.postgres import PostgresJobStore

        return PostgresJobStore(url, default_retention_s=default_retention_s, pool_max=pg_pool_max)
    raise ConfigError(
        f"unsupported job store URL {url!r}: use sqlite:///path/to/jobs.db or"
        " postgresql://user:password@host:5432/dbname"
    )


def open_configured_store(settings: Settings) -> JobStore:
    """The job store ``settings`` name, with their retention and pool size."""
    return open_store(
        settings.store_url(),
        default_retention_s=settings.result_retention_s,
        pg_pool_max=settings.pg_pool_max,
        sqlite_work_poll_s=settings.claim_poll_s,
    )
