"""Queue bounds on submit: at most ``max_queued_per_key`` queued requests per API key and
``max_queue_size`` in all; past either, 429 with ``Retry-After`` and a message naming the
limit. Running and finished requests do not count."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from http_support import LOOPBACK, MAX, AppFactory, PlayedWorker, edit_body, submit
from starlette.testclient import TestClient

from kontext_server.config import Settings
from kontext_server.core.auth import create_api_key
from kontext_server.core.service import RETRY_AFTER_S
from kontext_server.store.sqlite import SQLiteJobStore


@pytest.fixture
def limited_client(make_app: AppFactory, settings: Settings) -> Iterator[TestClient]:
    """Two queued requests per key, five in all."""
    limited = settings.model_copy(update={"max_queued_per_key": 2, "max_queue_size": 5})
    with TestClient(make_app(settings=limited), client=LOOPBACK) as client:
        yield client


def key_header(store: SQLiteJobStore, name: str) -> dict[str, str]:
    return {"Authorization": f"Key {create_api_key(store, name)[1]}"}


def test_a_key_at_its_queued_limit_gets_a_429_with_retry_after_and_the_limit(
    limited_client: TestClient, store: SQLiteJobStore
) -> None:
    alice = key_header(store, "alice")
    submit(limited_client, headers=alice)
    submit(limited_client, headers=alice)

    response = limited_client.post(f"/{MAX}", json=edit_body(), headers=alice)

    assert response.status_code == 429
    assert response.headers["retry-after"] == str(RETRY_AFTER_S)
    detail = response.json()["detail"]
    assert "2 queued requests for this API key (limit 2)" in detail
    assert store.queue_depth() == 2


def test_the_per_key_limit_leaves_other_keys_alone(
    limited_client: TestClient, store: SQLiteJobStore
) -> None:
    alice, bob = key_header(store, "alice"), key_header(store, "bob")
    submit(limited_client, headers=alice)
    submit(limited_client, headers=alice)

    submit(limited_client, headers=bob)

    assert limited_client.post(f"/{MAX}", json=edit_body(), headers=alice).status_code == 429


def test_a_started_request_no_longer_counts_against_the_key(
    limited_client: TestClient, worker: PlayedWorker
) -> None:
    submit(limited_client)
    submit(limited_client)
    assert limited_client.post(f"/{MAX}", json=edit_body()).status_code == 429

    worker.claim()

    submit(limited_client)


def test_without_keys_the_limit_applies_to_anonymous_callers_together(
    limited_client: TestClient,
) -> None:
    submit(limited_client)
    submit(limited_client)

    response = limited_client.post(f"/{MAX}", json=edit_body())

    assert response.status_code == 429
    assert "for anonymous callers (no API key) (limit 2)" in response.json()["detail"]


def test_a_full_queue_refuses_every_key_with_the_global_limit(
    limited_client: TestClient, store: SQLiteJobStore
) -> None:
    for name in ("a", "b"):
        headers = key_header(store, name)
        submit(limited_client, headers=headers)
        submit(limited_client, headers=headers)
    carol = key_header(store, "carol")
    submit(limited_client, headers=carol)

    response = limited_client.post(f"/{MAX}", json=edit_body(), headers=carol)

    assert response.status_code == 429
    assert response.headers["retry-after"] == str(RETRY_AFTER_S)
    assert "The queue is full: 5 queued requests in all (limit 5)" in response.json()["detail"]


def test_a_sync_run_is_bounded_like_a_submit(limited_client: TestClient) -> None:
    submit(limited_client)
    submit(limited_client)

    response = limited_client.post(f"/run/{MAX}", json=edit_body())

    assert response.status_code == 429
    assert "limit 2" in response.json()["detail"]


def _submit_together(app: FastAPI, count: int, headers: dict[str, str]) -> list[int]:
    """``count`` submits sent in one event-loop turn: one group-commit batch."""

    async def together() -> list[int]:
        transport = httpx.ASGITransport(app=app, client=(LOOPBACK, 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            answers = await asyncio.gather(
                *(http.post(f"/{MAX}", json=edit_body(), headers=headers) for _ in range(count))
            )
        return [answer.status_code for answer in answers]

    return asyncio.run(together())


def test_submits_arriving_together_cannot_overshoot_the_per_key_limit(
    make_app: AppFactory, settings: Settings, store: SQLiteJobStore
) -> None:
    limited = settings.model_copy(update={"max_queued_per_key": 3, "max_queue_size": 100})
    alice = key_header(store, "alice")
    submit_together = functools.partial(_submit_together, make_app(settings=limited))

    codes = submit_together(20, alice)

    assert sorted(codes) == [200] * 3 + [429] * 17
    assert store.queue_depth() == 3
    assert submit_together(2, key_header(store, "bob")) == [200, 200]  # bob has his own 3


def test_submits_arriving_together_cannot_overshoot_the_queue_size(
    make_app: AppFactory, settings: Settings, store: SQLiteJobStore
) -> None:
    limited = settings.model_copy(update={"max_queued_per_key": 100, "max_queue_size": 4})
    app = make_app(settings=limited)
    submit(TestClient(app, client=LOOPBACK))  # one already queued

    codes = _submit_together(app, 10, key_header(store, "alice"))

    assert sorted(codes) == [200] * 3 + [429] * 7
    assert store.queue_depth() == 4
