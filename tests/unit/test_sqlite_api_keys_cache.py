"""``SQLiteJobStore.has_api_keys`` is cached briefly (authentication asks on every request):
changes through the same store object show at once, through another one within
``API_KEYS_CACHE_S``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kontext_server.store import sqlite as sqlite_store
from kontext_server.store.sqlite import SQLiteJobStore


@pytest.fixture
def two_stores(tmp_path: Path) -> Iterator[tuple[SQLiteJobStore, SQLiteJobStore]]:
    serving, cli = SQLiteJobStore(tmp_path / "jobs.db"), SQLiteJobStore(tmp_path / "jobs.db")
    yield serving, cli
    serving.close()
    cli.close()


def test_a_key_created_or_revoked_through_the_same_store_shows_at_once(
    two_stores: tuple[SQLiteJobStore, SQLiteJobStore],
) -> None:
    serving, _ = two_stores
    assert not serving.has_api_keys()
    serving.create_api_key("key-1", "ci", "hash-1")
    assert serving.has_api_keys()
    serving.revoke_api_key("key-1")
    assert not serving.has_api_keys()


def test_a_key_created_by_another_process_shows_within_the_cache_time(
    two_stores: tuple[SQLiteJobStore, SQLiteJobStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "API_KEYS_CACHE_S", 0.05)
    serving, cli = two_stores
    assert not serving.has_api_keys()
    cli.create_api_key("key-1", "ci", "hash-1")
    time.sleep(0.06)
    assert serving.has_api_keys()
    cli.revoke_api_key("key-1")
    time.sleep(0.06)
    assert not serving.has_api_keys()
