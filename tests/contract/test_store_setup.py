"""Backend-specific setup: migrating an existing SQLite file, finding PostgreSQL binaries."""

from __future__ import annotations

import glob
import sqlite3
from pathlib import Path

import pytest

from contract.pg_cluster import find_pg_bin_dir
from kontext_server.domain.jobs import JobStatus
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.store.sqlite_schema import MIGRATIONS

DAY_S = 24 * 3600.0


def test_sqlite_file_of_schema_v1_is_migrated_and_its_old_jobs_expire(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL)")
        for statement in MIGRATIONS[0][1]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (1, 0)")
        conn.execute(
            "INSERT INTO jobs (id, endpoint, status, max_attempts, input, created_at,"
            " finished_at) VALUES ('old', 'e', 'succeeded', 1, '{}', 0, 1000)"
        )
    now = [1000 + 29 * DAY_S]
    store = SQLiteJobStore(path, clock=lambda: now[0])
    try:
        old = store.get("old")
        assert old is not None
        assert old.status is JobStatus.SUCCEEDED
        assert store.purge_expired() == []
        now[0] = 1000 + 31 * DAY_S
        assert [p.id for p in store.purge_expired()] == ["old"]
    finally:
        store.close()


def test_postgres_binaries_are_found_off_path_in_debians_folder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        pytest.skip("no Debian PostgreSQL package here (/usr/lib/postgresql/*/bin)")
    monkeypatch.setenv("PATH", "/nonexistent")
    found = find_pg_bin_dir()
    assert found is not None
    assert (found / "initdb").exists()
    assert (found / "pg_ctl").exists()
