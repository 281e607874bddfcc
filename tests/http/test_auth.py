"""API keys: authentication off (loopback only, header ignored) and on (Key / Bearer, 401,
and every request-id route answers 404 for another key's request)."""

from __future__ import annotations

from typing import Any, cast

import pytest
from fastapi import FastAPI
from http_support import LOOPBACK, MAX, LiveServer, edit_body, submit
from starlette.testclient import TestClient

from kontext_server.config import Settings
from kontext_server.core.auth import (
    Authenticator,
    AuthError,
    BadKeyThrottle,
    KeyCache,
    create_api_key,
    hash_api_key,
)
from kontext_server.domain.jobs import ApiKey, JobStatus
from kontext_server.files.local import LocalFileStore
from kontext_server.http.app import create_app
from kontext_server.store.base import JobStore
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.webhooks.signing import WebhookSigner

REMOTE = ("203.0.113.9", 40000)


def test_without_keys_any_authorization_header_is_ignored_on_loopback(
    client: TestClient,
) -> None:
    for header in ("Bearer {{YOUR_API_KEY}}", "Key not-a-key", "Basic Zm9vOmJhcg=="):
        submit(client, headers={"Authorization": header})


def test_without_keys_a_remote_client_is_refused_with_a_clear_message(app: FastAPI) -> None:
    with TestClient(app, client=REMOTE) as remote:
        response = remote.post(f"/{MAX}", json=edit_body())

    assert response.status_code == 403
    assert "kontext-server keys create" in response.json()["detail"]


def test_without_keys_insecure_no_auth_lets_remote_clients_in(
    make_app: object, settings: Settings
) -> None:
    insecure = settings.model_copy(update={"insecure_no_auth": True})
    with TestClient(make_app(settings=insecure), client=REMOTE) as remote:  # type: ignore[operator]
        submit(remote)


def test_a_real_loopback_connection_is_accepted_without_keys(live_server: LiveServer) -> None:
    import httpx

    response = httpx.post(f"{live_server.url}/{MAX}", json=edit_body())

    assert response.status_code == 200


@pytest.fixture
def two_keys(store: SQLiteJobStore) -> tuple[str, str]:
    return create_api_key(store, "alice")[1], create_api_key(store, "bob")[1]


@pytest.mark.parametrize("scheme", ["Key", "Bearer", "key", "bearer"])
def test_a_key_is_accepted_as_key_or_bearer(
    client: TestClient, two_keys: tuple[str, str], scheme: str
) -> None:
    submit(client, headers={"Authorization": f"{scheme} {two_keys[0]}"})


@pytest.mark.parametrize(
    "header", [None, "Key ", "Key unknown:secret", "Basic abc", "Bearer {{YOUR_API_KEY}}"]
)
def test_with_keys_a_missing_or_bad_key_is_a_401(
    client: TestClient, two_keys: tuple[str, str], header: str | None
) -> None:
    headers = {} if header is None else {"Authorization": header}

    response = client.post(f"/{MAX}", json=edit_body(), headers=headers)

    assert response.status_code == 401
    assert set(response.json()) == {"detail"}


def test_with_keys_a_remote_client_with_a_key_is_served(
    app: FastAPI, two_keys: tuple[str, str]
) -> None:
    with TestClient(app, client=REMOTE) as remote:
        submit(remote, headers={"Authorization": f"Key {two_keys[0]}"})


def test_a_revoked_key_is_refused(
    client: TestClient, store: SQLiteJobStore, two_keys: tuple[str, str]
) -> None:
    alice = two_keys[0]
    assert store.revoke_api_key(alice.partition(":")[0])

    response = client.post(f"/{MAX}", json=edit_body(), headers={"Authorization": f"Key {alice}"})

    assert response.status_code == 401


def test_keys_are_stored_only_as_hashes(store: SQLiteJobStore, two_keys: tuple[str, str]) -> None:
    alice = two_keys[0]
    database = [store.path, store.path.with_name(store.path.name + "-wal")]
    raw = b"".join(path.read_bytes() for path in database if path.exists())

    assert hash_api_key(alice).encode() in raw
    assert alice.partition(":")[2].encode() not in raw
    assert store.find_api_key(hash_api_key(alice)) is not None


def test_another_keys_request_is_a_404_on_every_request_id_route(
    client: TestClient, store: SQLiteJobStore, two_keys: tuple[str, str]
) -> None:
    alice = {"Authorization": f"Key {two_keys[0]}"}
    bob = {"Authorization": f"Bearer {two_keys[1]}"}
    answer = submit(client, headers=alice)
    request_id = answer["request_id"]

    for path in (
        f"/fal-ai/flux-pro/requests/{request_id}/status",
        f"/fal-ai/flux-pro/requests/{request_id}/status/stream",
        f"/fal-ai/flux-pro/requests/{request_id}",
        f"/queue/{MAX}/requests/{request_id}",
    ):
        assert client.get(path, headers=bob).status_code == 404, path
    cancel = client.put(answer["cancel_url"], headers=bob)
    assert cancel.status_code == 404
    assert cancel.json() == {"status": "NOT_FOUND"}
    job = store.get(request_id)
    assert job is not None
    assert job.status is JobStatus.QUEUED
    assert client.get(answer["status_url"], headers=alice).status_code == 202


def test_requests_without_auth_are_refused_on_every_route_once_keys_exist(
    client: TestClient, two_keys: tuple[str, str]
) -> None:
    answer = submit(client, headers={"Authorization": f"Key {two_keys[0]}"})

    assert client.get(answer["status_url"]).status_code == 401
    assert client.get(answer["response_url"]).status_code == 401
    assert client.put(answer["cancel_url"]).status_code == 401
    assert client.post(f"/run/{MAX}", json=edit_body()).status_code == 401


def test_keys_created_while_serving_turn_authentication_on(
    app: FastAPI, store: SQLiteJobStore
) -> None:
    with TestClient(app, client=LOOPBACK) as client:
        submit(client)
        create_api_key(store, "late")
        assert client.post(f"/{MAX}", json=edit_body()).status_code == 401


class CountingStore:
    """A real store that counts the calls made to it by name."""

    def __init__(self, inner: SQLiteJobStore) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> object:
        method = getattr(self.inner, name)
        if not callable(method):  # e.g. waits_on_network: the real store's answer
            return method

        def counted(*args: object, **kwargs: object) -> object:
            self.calls.append(name)
            return method(*args, **kwargs)

        return counted


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _authenticator(store: SQLiteJobStore, ttl_s: float, clock: Clock) -> tuple[Any, CountingStore]:
    counting = CountingStore(store)
    authenticator = Authenticator(cast(JobStore, counting), keys=KeyCache(ttl_s, clock=clock))
    return authenticator, counting


def test_a_found_key_is_trusted_for_the_cache_time_without_a_store_call(
    store: SQLiteJobStore,
) -> None:
    clock = Clock()
    key = create_api_key(store, "alice")[1]
    authenticator, counting = _authenticator(store, 5.0, clock)
    header = f"Key {key}"
    assert authenticator.authenticate_from_cache(header, "203.0.113.9") is None  # not yet known

    owner = authenticator.authenticate(header, "203.0.113.9").owner
    assert "find_api_key" in counting.calls
    counting.calls.clear()
    for _ in range(3):
        principal = authenticator.authenticate_from_cache(header, "203.0.113.9")
        assert principal is not None and principal.owner == owner
    assert authenticator.authenticate(header, "203.0.113.9").owner == owner
    assert "find_api_key" not in counting.calls  # answered from the cache

    clock.now += 5.0  # the cache time is over: the store is asked again
    assert authenticator.authenticate_from_cache(header, "203.0.113.9") is None
    counting.calls.clear()
    authenticator.authenticate(header, "203.0.113.9")
    assert counting.calls.count("find_api_key") == 1


def test_a_key_revoked_elsewhere_is_refused_within_the_cache_time(store: SQLiteJobStore) -> None:
    clock = Clock()
    key = create_api_key(store, "alice")[1]
    create_api_key(store, "bob")  # keys still exist after alice's is revoked
    authenticator, _ = _authenticator(store, 5.0, clock)
    authenticator.authenticate(f"Key {key}", "203.0.113.9")

    assert store.revoke_api_key(key.partition(":")[0])  # e.g. `kontext-server keys revoke`
    for _ in range(2):  # uses within the cache time do not extend it (BFL, OpenAI, uploads)
        authenticator.authenticate(f"Key {key}", "203.0.113.9")
        assert authenticator.authenticate_from_cache(f"Key {key}", "203.0.113.9") is not None
        clock.now += 2.0
    clock.now += 1.0  # 5 s since the key was read from the store
    assert authenticator.authenticate_from_cache(f"Key {key}", "203.0.113.9") is None
    with pytest.raises(AuthError) as refused:
        authenticator.authenticate(f"Key {key}", "203.0.113.9")
    assert refused.value.status_code == 401


def test_a_cache_time_of_zero_asks_the_store_every_time(store: SQLiteJobStore) -> None:
    key = create_api_key(store, "alice")[1]
    authenticator, counting = _authenticator(store, 0.0, Clock())
    for _ in range(3):
        authenticator.authenticate(f"Key {key}", "203.0.113.9")
        assert authenticator.authenticate_from_cache(f"Key {key}", "203.0.113.9") is None
    assert counting.calls.count("find_api_key") == 3


def test_wrong_keys_are_never_cached_and_a_locked_out_client_is_refused_even_cached(
    store: SQLiteJobStore,
) -> None:
    key = create_api_key(store, "alice")[1]
    authenticator, counting = _authenticator(store, 5.0, Clock())
    authenticator.throttle = BadKeyThrottle(max_failures=2)
    authenticator.authenticate(f"Key {key}", "203.0.113.9")
    for _ in range(3):
        with pytest.raises(AuthError):
            authenticator.authenticate(f"Key {key}x", "203.0.113.9")
    assert counting.calls.count("find_api_key") == 4  # every wrong key was looked up
    with pytest.raises(AuthError) as locked:
        authenticator.authenticate_from_cache(f"Key {key}", "203.0.113.9")
    assert locked.value.status_code == 429


def test_the_key_cache_is_bounded() -> None:
    cache = KeyCache(60.0, max_entries=3, clock=Clock())
    for index in range(3):
        cache.put(f"hash-{index}", ApiKey(id=f"k{index}", name="n", created_at=0.0))
    assert cache.get("hash-0") is not None  # used: now the most recent
    cache.put("hash-3", ApiKey(id="k3", name="n", created_at=0.0))
    assert len(cache) == 3
    assert cache.get("hash-1") is None  # the least recently used went first
    assert all(cache.get(f"hash-{index}") is not None for index in (0, 2, 3))


def test_a_status_poll_with_a_key_reads_only_its_job(
    settings: Settings, store: SQLiteJobStore, files: LocalFileStore, signer: WebhookSigner
) -> None:
    """One round trip per poll: the job (its queue position comes from memory)."""
    key = create_api_key(store, "alice")[1]
    counting = CountingStore(store)
    app = create_app(settings, cast(JobStore, counting), files, signer=signer, run_background=False)
    with TestClient(app, client=REMOTE) as remote:
        headers = {"Authorization": f"Key {key}"}
        status_url = submit(remote, headers=headers)["status_url"]
        counting.calls.clear()
        for _ in range(5):
            assert remote.get(status_url, headers=headers).status_code == 202
    from_memory = {"known_has_api_keys", "queue_position_of"}  # no store round trip
    assert [call for call in counting.calls if call not in from_memory] == ["get"] * 5
