"""Submit (PROTOCOL.md §3): answer shape, URLs built from the request, queue positions,
fal's request headers and idempotency."""

from __future__ import annotations

import time

from fastapi import FastAPI
from http_support import LOOPBACK, MAX, MULTI, edit_body, submit
from starlette.testclient import TestClient

from kontext_server.core.service import MaintenanceLoop
from kontext_server.domain.editing import EditInput
from kontext_server.domain.jobs import PRIORITY_LOW, PRIORITY_NORMAL, JobStatus
from kontext_server.store.sqlite import SQLiteJobStore

SUBMIT_KEYS = {
    "status",
    "request_id",
    "response_url",
    "status_url",
    "cancel_url",
    "queue_position",
    "logs",
    "metrics",
    "gateway_request_id",
}


def test_submit_answers_the_protocol_shape_with_urls_under_the_owner_alias(
    client: TestClient,
) -> None:
    response = client.post(f"/{MAX}", json=edit_body())

    assert response.status_code == 200
    answer = response.json()
    assert set(answer) == SUBMIT_KEYS
    request_id = answer["request_id"]
    base = f"http://testserver/fal-ai/flux-pro/requests/{request_id}"
    assert answer["status"] == "IN_QUEUE"
    assert answer["response_url"] == base
    assert answer["status_url"] == f"{base}/status"
    assert answer["cancel_url"] == f"{base}/cancel"
    assert answer["queue_position"] == 0
    assert answer["logs"] is None
    assert answer["metrics"] == {}
    assert answer["gateway_request_id"] == request_id
    assert response.headers["x-fal-request-id"] == request_id


def test_submit_under_queue_prefix_answers_urls_under_queue(client: TestClient) -> None:
    answer = submit(
        client, path=f"queue/{MULTI}", body={"prompt": "x", "image_urls": ["https://a.b/c"]}
    )

    assert answer["status_url"] == (
        f"http://testserver/queue/fal-ai/flux-pro/requests/{answer['request_id']}/status"
    )
    assert client.get(answer["status_url"]).json()["status"] == "IN_QUEUE"


def test_submit_behind_a_path_prefix_answers_urls_that_lead_back(app: FastAPI) -> None:
    with TestClient(app, client=LOOPBACK, root_path="/edit-api") as client:
        answer = submit(client)

    assert answer["response_url"] == (
        f"http://testserver/edit-api/fal-ai/flux-pro/requests/{answer['request_id']}"
    )


def test_submit_urls_follow_the_host_the_client_used(client: TestClient) -> None:
    answer = submit(client, headers={"host": "edits.example.org:8443"})

    assert answer["cancel_url"].startswith("http://edits.example.org:8443/fal-ai/flux-pro/")


def test_queue_position_counts_the_requests_ahead(client: TestClient) -> None:
    positions = [submit(client)["queue_position"] for _ in range(3)]

    assert positions == [0, 1, 2]


def test_low_priority_sits_behind_every_normal_request(
    client: TestClient, store: SQLiteJobStore
) -> None:
    low = submit(client, headers={"X-Fal-Queue-Priority": "low"})
    normal = submit(client, headers={"X-Fal-Queue-Priority": "normal"})
    later_low = submit(client, headers={"X-Fal-Queue-Priority": "low"})

    assert normal["queue_position"] == 0
    assert later_low["queue_position"] == 2
    assert client.get(low["status_url"]).json()["queue_position"] == 1
    stored = store.get(low["request_id"])
    assert stored is not None
    assert stored.priority == PRIORITY_LOW
    assert store.get(normal["request_id"]).priority == PRIORITY_NORMAL  # type: ignore[union-attr]


def test_an_unknown_priority_is_a_422_that_names_the_allowed_values(client: TestClient) -> None:
    response = client.post(f"/{MAX}", json=edit_body(), headers={"X-Fal-Queue-Priority": "urgent"})

    assert response.status_code == 422
    assert "'normal' or 'low'" in response.json()["detail"][0]["msg"]


def test_request_timeout_fails_a_request_not_started_in_time(
    client: TestClient, store: SQLiteJobStore
) -> None:
    answer = submit(client, headers={"X-Fal-Request-Timeout": "0.05"})
    time.sleep(0.1)
    MaintenanceLoop(store).run_once()

    status = client.get(answer["status_url"]).json()
    assert status["status"] == "COMPLETED"
    assert status["error_type"] == "request_timeout"
    result = client.get(answer["response_url"])
    assert result.status_code == 504
    assert result.headers["x-fal-error-type"] == "request_timeout"


def test_the_fal_hint_headers_are_tolerated_and_no_retry_means_one_attempt(
    client: TestClient, store: SQLiteJobStore
) -> None:
    headers = {
        "X-Fal-Runner-Hint": "gpu-7",
        "X-Fal-No-Retry": "1",
        "X-Fal-Object-Lifecycle-Preference": '{"expiration_duration_seconds": 60}',
        "X-Fal-Request-Timeout-Type": "user",
    }
    answer = submit(client, headers=headers)

    job = store.get(answer["request_id"])
    assert job is not None
    assert job.max_attempts == 1
    assert store.get(submit(client)["request_id"]).max_attempts > 1  # type: ignore[union-attr]


def test_the_same_idempotency_key_and_body_give_the_same_request(client: TestClient) -> None:
    first = submit(client, headers={"Idempotency-Key": "order-17"})
    again = submit(client, headers={"Idempotency-Key": "order-17"})

    assert again["request_id"] == first["request_id"]


def test_the_same_idempotency_key_with_another_body_is_a_409(client: TestClient) -> None:
    submit(client, headers={"Idempotency-Key": "order-17"})
    response = client.post(
        f"/{MAX}", json=edit_body(prompt="something else"), headers={"Idempotency-Key": "order-17"}
    )

    assert response.status_code == 409
    assert "Idempotency-Key" in response.json()["detail"]


def test_submit_to_an_unknown_endpoint_is_a_404_that_lists_the_served_ones(
    client: TestClient,
) -> None:
    response = client.post("/fal-ai/flux-pro/kontext/ultra", json=edit_body())

    assert response.status_code == 404
    assert MAX in response.json()["detail"]


def test_submit_stores_the_validated_input_with_its_defaults(
    client: TestClient, store: SQLiteJobStore
) -> None:
    answer = submit(client, body=edit_body(safety_tolerance=5, unknown_field="ignored"))

    job = store.get(answer["request_id"])
    assert job is not None
    assert job.status is JobStatus.QUEUED
    assert job.endpoint == MAX
    assert job.input == EditInput(
        prompt="Put a donut next to the flour.",
        references=("https://example.com/cat.png",),
        seed=None,
        guidance_scale=3.5,
        inline_output=False,
        num_images=1,
        safety_tolerance=5,
        output_format="jpeg",
        aspect_ratio=None,
        enhance_prompt=False,
    )
    assert job.base_url == "http://testserver"
