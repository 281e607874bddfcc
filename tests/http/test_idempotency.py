"""``Idempotency-Key`` beyond the basics in test_submit.py: keys are scoped per API key, the
endpoint is part of "the same request", and a retry returns the request as it is now."""

from __future__ import annotations

from http_support import MAX, MULTI, PlayedWorker, edit_body, submit
from starlette.testclient import TestClient

from kontext_server.core.auth import create_api_key
from kontext_server.store.sqlite import SQLiteJobStore


def test_the_same_idempotency_key_from_two_api_keys_makes_two_requests(
    client: TestClient, store: SQLiteJobStore
) -> None:
    alice = {"Authorization": f"Key {create_api_key(store, 'alice')[1]}", "Idempotency-Key": "k1"}
    bob = {"Authorization": f"Key {create_api_key(store, 'bob')[1]}", "Idempotency-Key": "k1"}

    assert submit(client, headers=alice)["request_id"] != submit(client, headers=bob)["request_id"]


def test_the_same_idempotency_key_on_another_endpoint_is_a_409_naming_the_first_request(
    client: TestClient,
) -> None:
    first = submit(client, headers={"Idempotency-Key": "order-18"})

    response = client.post(
        f"/{MULTI}",
        json={"prompt": edit_body()["prompt"], "image_urls": [edit_body()["image_url"]]},
        headers={"Idempotency-Key": "order-18"},
    )

    assert response.status_code == 409
    detail = response.json()["detail"]
    assert "'order-18' was already used for a different request" in detail
    assert first["request_id"] in detail


def test_a_retry_after_the_request_ran_answers_the_same_request_and_its_state(
    client: TestClient, worker: PlayedWorker
) -> None:
    first = submit(client, headers={"Idempotency-Key": "order-19"})
    worker.claim()
    worker.succeed()

    again = submit(client, headers={"Idempotency-Key": "order-19"})

    assert again["request_id"] == first["request_id"]
    assert client.get(again["status_url"]).json()["status"] == "COMPLETED"


def test_an_overlong_idempotency_key_is_a_422_that_says_the_maximum(client: TestClient) -> None:
    response = client.post(f"/{MAX}", json=edit_body(), headers={"Idempotency-Key": "k" * 256})

    assert response.status_code == 422
    assert "at most 255 characters" in response.json()["detail"][0]["msg"]
