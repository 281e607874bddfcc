"""What only the SQLite store promises (the shared rules are in ``tests/contract``)."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from pathlib import Path

import pytest

from kontext_server.domain.editing import EditInput
from kontext_server.domain.errors import StoreError
from kontext_server.domain.jobs import NewJob
from kontext_server.store import open_store
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.store.sqlite_schema import SCHEMA_VERSION


def new_job() -> NewJob:
    return NewJob(
        id=str(uuid.uuid4()), endpoint="fal-ai/flux-pro/kontext/max", input=EditInput(prompt="p")
    )


def test_database_is_in_wal_mode_with_the_current_schema(tmp_path: Path) -> None:
    SQLiteJobStore(tmp_path / "jobs.db").close()
    with sqlite3.connect(tmp_path / "jobs.db") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = [v for (v,) in raw.execute("SELECT version FROM schema_version")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))


def test_parent_folders_are_created(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "a" / "b" / "jobs.db")
    assert store.queue_depth() == 0
    store.close()


def test_reopening_does_not_migrate_again(tmp_path: Path) -> None:
    for _ in range(3):
        SQLiteJobStore(tmp_path / "jobs.db").close()
    with sqlite3.connect(tmp_path / "jobs.db") as raw:
        assert raw.execute("SELECT count(*) FROM schema_version").fetchone()[0] == SCHEMA_VERSION


def test_processes_opening_together_migrate_once(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def open_and_close() -> None:
        try:
            SQLiteJobStore(tmp_path / "jobs.db").close()
        except BaseException as exc:  # collected: a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=open_and_close) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_a_newer_schema_is_refused_with_advice(tmp_path: Path) -> None:
    SQLiteJobStore(tmp_path / "jobs.db").close()
    with sqlite3.connect(tmp_path / "jobs.db") as raw:
        raw.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="upgrade kontext-server"):
        SQLiteJobStore(tmp_path / "jobs.db")


def test_memory_url_gives_a_private_store_removed_on_close() -> None:
    store = open_store("sqlite:///:memory:")
    assert isinstance(store, SQLiteJobStore)
    store.submit(new_job())
    assert store.queue_depth() == 1
    other = open_store("sqlite:///:memory:")
    assert other.queue_depth() == 0
    other.close()
    store.close()
    assert not store.path.exists()


def test_each_thread_uses_its_own_connection(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.db")
    job, _ = store.submit(new_job())
    seen: list[object] = []

    def read() -> None:
        assert store.get(job.id) == job
        seen.append(store._conn())  # the private handle: only to tell connections apart

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(conn) for conn in seen}) == 3
    store.close()


def test_closed_store_refuses_work(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.db")
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.queue_depth()
