"""Conformance: API keys, stored by hash (the caller hashes), on every backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from kontext_server.domain.errors import StoreError
from kontext_server.domain.jobs import ApiKey
from kontext_server.store.base import JobStore

if TYPE_CHECKING:
    from tests.contract.conftest import FakeClock


def test_no_keys_means_authentication_is_off(store: JobStore) -> None:
    assert not store.has_api_keys()
    assert store.list_api_keys() == []
    assert store.find_api_key("anything") is None


def test_created_key_is_found_by_its_hash(store: JobStore, clock: FakeClock) -> None:
    created = store.create_api_key("key-1", "laptop", "hash-1")
    assert created == ApiKey(id="key-1", name="laptop", created_at=clock.now, revoked_at=None)
    assert store.find_api_key("hash-1") == created
    assert store.find_api_key("hash-2") is None
    assert store.has_api_keys()


def test_keys_are_listed_oldest_first(store: JobStore, clock: FakeClock) -> None:
    store.create_api_key("key-b", "second", "hash-b")
    clock.advance(1)
    store.create_api_key("key-a", "third", "hash-a")
    clock.advance(-2)
    store.create_api_key("key-c", "first", "hash-c")
    assert [k.name for k in store.list_api_keys()] == ["first", "second", "third"]


def test_revoked_key_is_listed_but_no_longer_found(store: JobStore, clock: FakeClock) -> None:
    store.create_api_key("key-1", "laptop", "hash-1")
    clock.advance(5)
    assert store.revoke_api_key("key-1")
    assert store.find_api_key("hash-1") is None
    assert not store.has_api_keys()
    [listed] = store.list_api_keys()
    assert (listed.id, listed.revoked_at) == ("key-1", clock.now)


def test_revoking_twice_or_an_unknown_key_reports_false(store: JobStore) -> None:
    store.create_api_key("key-1", "laptop", "hash-1")
    assert store.revoke_api_key("key-1")
    assert not store.revoke_api_key("key-1")
    assert not store.revoke_api_key("no-such-key")


def test_one_active_key_keeps_authentication_on(store: JobStore) -> None:
    store.create_api_key("key-1", "old", "hash-1")
    store.create_api_key("key-2", "new", "hash-2")
    store.revoke_api_key("key-1")
    assert store.has_api_keys()


@pytest.mark.parametrize(("key_id", "key_hash"), [("key-1", "hash-2"), ("key-2", "hash-1")])
def test_duplicate_id_or_hash_is_refused(store: JobStore, key_id: str, key_hash: str) -> None:
    store.create_api_key("key-1", "laptop", "hash-1")
    with pytest.raises(StoreError):
        store.create_api_key(key_id, "again", key_hash)
    assert len(store.list_api_keys()) == 1
