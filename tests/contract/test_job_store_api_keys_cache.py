"""``JobStore.has_api_keys`` is cached briefly (authentication asks on every request):
changes through the same store object show at once, through another one (another process,
e.g. ``kontext-server keys``) within ``API_KEYS_CACHE_S``."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from kontext_server.store import common
from kontext_server.store.base import JobStore


def test_a_key_created_or_revoked_through_the_same_store_shows_at_once(
    open_store: Callable[[], JobStore],
) -> None:
    serving = open_store()
    assert not serving.has_api_keys()
    serving.create_api_key("key-1", "ci", "hash-1")
    assert serving.has_api_keys()
    serving.revoke_api_key("key-1")
    assert not serving.has_api_keys()


def test_a_key_created_by_another_process_shows_within_the_cache_time(
    open_store: Callable[[], JobStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(common, "API_KEYS_CACHE_S", 0.05)
    serving, cli = open_store(), open_store()
    assert not serving.has_api_keys()
    cli.create_api_key("key-1", "ci", "hash-1")
    time.sleep(0.06)
    assert serving.has_api_keys()
    cli.revoke_api_key("key-1")
    time.sleep(0.06)
    assert not serving.has_api_keys()


def test_the_answer_is_trusted_for_the_cache_time(open_store: Callable[[], JobStore]) -> None:
    serving, cli = open_store(), open_store()
    assert not serving.has_api_keys()
    cli.create_api_key("key-1", "ci", "hash-1")
    assert not serving.has_api_keys()  # within API_KEYS_CACHE_S (1 s) of the first answer


def test_the_known_answer_is_the_cached_one_and_none_once_it_is_stale(
    open_store: Callable[[], JobStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(common, "API_KEYS_CACHE_S", 0.05)
    serving = open_store()
    assert serving.known_has_api_keys() is None  # never asked: a store call is needed
    assert not serving.has_api_keys()
    assert serving.known_has_api_keys() is False
    serving.create_api_key("key-1", "ci", "hash-1")
    assert serving.known_has_api_keys() is None  # forgotten: the next answer asks
    assert serving.has_api_keys()
    assert serving.known_has_api_keys() is True
    time.sleep(0.06)
    assert serving.known_has_api_keys() is None
