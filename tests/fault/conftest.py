"""Fixtures of the fault tests: backends (PostgreSQL + S3, SQLite + a local folder) and a
registry of the processes a test starts, killed at its end whatever happened.

``s3_server``/``s3_bucket`` are the moto server of ``tests/s3_fixtures.py`` (shared with the
unit tests; ``tests`` is on pytest's ``pythonpath``); ``pg_cluster`` comes from
``tests/conftest.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_support import Backend, Processes

from contract.pg_cluster import PgCluster
from s3_fixtures import S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, S3Server, s3_bucket, s3_server

__all__ = ["backend", "pg_backend", "processes", "s3_bucket", "s3_server"]

_database_numbers = itertools.count(1)


def postgres_s3_backend(pg_cluster: PgCluster, s3_server: S3Server) -> Backend:
    """A fresh database and a fresh bucket; outputs under the ``outputs/`` prefix."""
    store_url = pg_cluster.create_database(f"fault_{next(_database_numbers)}")
    bucket = s3_server.create_bucket()

    def list_file_keys() -> set[str]:
        pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {item["Key"] for page in pages for item in page.get("Contents", [])}

    env = {
        "KONTEXT_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "KONTEXT_S3_ACCESS_KEY_ID": S3_ACCESS_KEY_ID,
        "KONTEXT_S3_SECRET_ACCESS_KEY": S3_SECRET_ACCESS_KEY,
        "KONTEXT_S3_PATH_STYLE": "1",
    }
    return Backend("postgres", store_url, f"s3://{bucket}/outputs", env, list_file_keys)


def sqlite_backend(folder: Path) -> Backend:
    files = folder / "files"
    files.mkdir(parents=True)

    def list_file_keys() -> set[str]:
        return {p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file()}

    return Backend(
        "sqlite", f"sqlite:///{folder / 'jobs.db'}", f"file://{files}", {}, list_file_keys
    )


@pytest.fixture(params=["postgres", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each test using it runs twice: on PostgreSQL + S3 and on SQLite + local files."""
    if request.param == "sqlite":
        return sqlite_backend(tmp_path / "sqlite")
    return postgres_s3_backend(
        request.getfixturevalue("pg_cluster"), request.getfixturevalue("s3_server")
    )


@pytest.fixture
def pg_backend(pg_cluster: PgCluster, s3_server: S3Server) -> Backend:
    return postgres_s3_backend(pg_cluster, s3_server)


@pytest.fixture
def processes() -> Iterator[Processes]:
    registry = Processes()
    try:
        yield registry
    finally:
        registry.close()
