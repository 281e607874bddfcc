"""BFL's API (``/v1/flux-kontext-*``, ``/v1/get_result``): mapping onto the fal endpoints,
BFL's statuses and errors, ``x-key`` authentication, and BFL's signed webhook."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
from typing import Any

import httpx
import pytest
from http_support import LOOPBACK, MAX, MULTI, LiveServer, PlayedWorker, tiny_png_data_uri
from PIL import Image
from starlette.testclient import TestClient
from test_webhooks_files_cors import Receiver, allowing_receiver_port

from kontext_server.config import Settings
from kontext_server.core.auth import create_api_key
from kontext_server.domain.jobs import JobStatus
from kontext_server.files.local import LocalFileStore
from kontext_server.http.app import create_app
from kontext_server.http.bfl.wire import BFL_API
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.webhooks.signing import WebhookSigner

IMAGE_URL = "https://example.com/cat.png"
SECRET = "bfl-webhook-secret-value-123"


def png_base64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "green").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def bfl_submit(client: TestClient, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return client.post("/v1/flux-kontext-max", json=body, **kw)


def test_one_input_image_queues_a_max_job_with_bfl_defaults(
    client: TestClient, store: SQLiteJobStore
) -> None:
    response = bfl_submit(client, {"prompt": "make it blue", "input_image": IMAGE_URL})

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["polling_url"] == f"http://testserver/v1/get_result?id={answer['id']}"
    job = store.get(answer["id"])
    assert job is not None and job.endpoint == MAX
    assert job.input.references == (IMAGE_URL,)
    assert job.input.output_format == "png"  # BFL's default, not fal's jpeg
    assert job.input.safety_tolerance == 2
    assert job.input.enhance_prompt is False


def test_several_input_images_queue_a_multi_job_and_base64_becomes_a_data_uri(
    client: TestClient, store: SQLiteJobStore
) -> None:
    body = {
        "prompt": "combine",
        "input_image": png_base64(),
        "input_image_3": IMAGE_URL,
        "seed": 7,
        "aspect_ratio": "16:9",
        "prompt_upsampling": True,
        "safety_tolerance": 0,
        "output_format": "jpeg",
    }
    answer = client.post("/v1/flux-kontext-pro", json=body).json()

    job = store.get(answer["id"])
    assert job is not None and job.endpoint == MULTI
    first, second = job.input.references
    assert first.startswith("data:image/png;base64,") and second == IMAGE_URL
    assert (job.input.seed, job.input.aspect_ratio) == (7, "16:9")
    assert job.input.enhance_prompt is True
    assert job.input.safety_tolerance == 1  # BFL's 0 is the strictest level, fal's 1
    assert job.input.output_format == "jpeg"


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"prompt": "x"}, "input_image", "input_image is required"),
        ({"prompt": "x", "input_image": "not base64 !"}, "input_image", "base64-encoded"),
        (
            {"prompt": "x", "input_image": IMAGE_URL, "safety_tolerance": 7},
            "safety_tolerance",
            "from 0",
        ),
        ({"prompt": "x", "input_image": IMAGE_URL, "aspect_ratio": "30:1"}, "aspect_ratio", "21:9"),
        (
            {"prompt": "x", "input_image": IMAGE_URL, "webhook_url": "ftp://x"},
            "webhook_url",
            "http(s)",
        ),
        (
            {"prompt": "x", "input_image": IMAGE_URL, "output_format": "webp"},
            "output_format",
            '"jpeg" or "png"',
        ),
        ({"prompt": " ", "input_image": IMAGE_URL}, "prompt", "must not be empty"),
        (
            {"prompt": "x", "input_image": IMAGE_URL, "input_image_2": "http://"},
            "input_image_2",
            "input_image_2",
        ),
    ],
)
def test_invalid_fields_are_answered_422_with_bfl_field_names(
    client: TestClient, body: dict[str, Any], field: str, says: str
) -> None:
    response = bfl_submit(client, body)

    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert [entry["loc"] for entry in detail] == [["body", field]]
    assert says in detail[0]["msg"]


def test_a_body_that_is_not_json_is_a_422(client: TestClient) -> None:
    response = client.post("/v1/flux-kontext-max", content=b"{nope")

    assert response.status_code == 422
    assert "not valid JSON" in response.json()["detail"][0]["msg"]


def test_get_result_follows_the_job_from_pending_to_ready(
    client: TestClient, worker: PlayedWorker
) -> None:
    job_id = bfl_submit(client, {"prompt": "p", "input_image": IMAGE_URL}).json()["id"]
    pending = client.get("/v1/get_result", params={"id": job_id}).json()
    worker.claim()
    worker.progress(1, 4)
    running = client.get("/v1/get_result", params={"id": job_id}).json()
    worker.succeed(output_format="png")

    ready = client.get("/v1/get_result", params={"id": job_id}).json()

    assert (pending["status"], pending["result"], pending["progress"]) == ("Pending", None, 0.0)
    assert (running["status"], running["progress"]) == ("Pending", 0.25)
    assert ready["status"] == "Ready" and ready["progress"] == 1.0
    sample = ready["result"]["sample"]
    assert sample.startswith("http://testserver/files/")
    assert (ready["result"]["seed"], ready["result"]["prompt"]) == (42, "p")
    assert client.get(sample).status_code == 200


def test_failed_and_moderated_jobs_read_error_and_request_moderated(
    client: TestClient, worker: PlayedWorker
) -> None:
    failed_id = bfl_submit(client, {"prompt": "p", "input_image": IMAGE_URL}).json()["id"]
    worker.claim()
    worker.fail("cannot fetch the image", "file_download_error")
    moderated_id = bfl_submit(client, {"prompt": "p", "input_image": IMAGE_URL}).json()["id"]
    worker.claim()
    worker.fail("the prompt is blocked", "content_policy_violation")

    failed = client.get("/v1/get_result", params={"id": failed_id}).json()
    moderated = client.get("/v1/get_result", params={"id": moderated_id}).json()

    assert failed["status"] == "Error" and failed["result"] is None
    assert failed["details"]["error"] == "cannot fetch the image"
    assert moderated["status"] == "Request Moderated"


def test_an_unknown_id_is_task_not_found(client: TestClient) -> None:
    response = client.get("/v1/get_result", params={"id": "no-such-task"})

    assert response.status_code == 404
    assert response.json()["status"] == "Task not found"


def test_x_key_authenticates_and_jobs_of_other_keys_are_not_found(
    make_app: Any, store: SQLiteJobStore
) -> None:
    _, key = create_api_key(store, "bfl")
    _, other_key = create_api_key(store, "other")
    with TestClient(make_app(), client=LOOPBACK) as client:
        missing = bfl_submit(client, {"prompt": "p", "input_image": IMAGE_URL})
        wrong = bfl_submit(
            client, {"prompt": "p", "input_image": IMAGE_URL}, headers={"x-key": "a:b"}
        )
        ok = bfl_submit(client, {"prompt": "p", "input_image": IMAGE_URL}, headers={"x-key": key})
        job_id = ok.json()["id"]
        mine = client.get("/v1/get_result", params={"id": job_id}, headers={"x-key": key})
        theirs = client.get("/v1/get_result", params={"id": job_id}, headers={"x-key": other_key})

    assert (missing.status_code, wrong.status_code, ok.status_code) == (401, 401, 200)
    assert mine.json()["status"] == "Pending"
    assert theirs.status_code == 404


def test_without_keys_only_loopback_callers_are_served(make_app: Any) -> None:
    with TestClient(make_app(), client=("203.0.113.9", 5000)) as client:
        response = bfl_submit(client, {"prompt": "p", "input_image": IMAGE_URL})

    assert response.status_code == 403


def test_the_webhook_secret_stays_out_of_fal_answers_and_logs(
    client: TestClient, worker: PlayedWorker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    body = {
        "prompt": "p",
        "input_image": IMAGE_URL,
        "webhook_url": "https://hooks.example.com/b",
        "webhook_secret": SECRET,
    }
    job_id = bfl_submit(client, body).json()["id"]
    worker.claim()
    worker.succeed()

    answers = [
        client.get(f"/fal-ai/flux-pro/requests/{job_id}/status", params={"logs": "1"}).text,
        client.get(f"/fal-ai/flux-pro/requests/{job_id}").text,
        client.get("/v1/get_result", params={"id": job_id}).text,
    ]

    assert all(SECRET not in answer for answer in answers)
    assert SECRET not in caplog.text


def test_bfl_webhook_is_bfl_shaped_and_signed_with_the_secret(
    settings: Settings,
    store: SQLiteJobStore,
    files: LocalFileStore,
    signer: WebhookSigner,
    worker: PlayedWorker,
) -> None:
    with Receiver() as receiver:
        app = create_app(allowing_receiver_port(settings, receiver), store, files, signer=signer)
        with LiveServer(app) as server:
            body = {
                "prompt": "p",
                "input_image": IMAGE_URL,
                "webhook_url": receiver.url,
                "webhook_secret": SECRET,
            }
            job_id = httpx.post(f"{server.url}/v1/flux-kontext-max", json=body).json()["id"]
            worker.claim()
            worker.succeed()
            assert receiver.arrived.wait(10), "no webhook arrived"

    headers, raw = receiver.received[0]
    payload = json.loads(raw)
    expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    assert headers["X-BFL-Signature"] == expected
    assert (payload["id"], payload["status"]) == (job_id, "Ready")
    assert payload["result"]["sample"].startswith(f"{server.url}/files/")
    assert payload["timestamp"].endswith("Z")
    assert SECRET.encode() not in raw


def test_bfl_webhook_of_a_failure_is_an_error_body(
    client: TestClient, app: Any, worker: PlayedWorker
) -> None:
    body = {"prompt": "p", "input_image": IMAGE_URL, "webhook_url": "https://h.example.com/x"}
    job_id = bfl_submit(client, body).json()["id"]
    worker.claim()
    worker.fail("boom", "internal_error")
    job = app.state.context.service.get(job_id)
    webhooks = app.state.services.webhooks

    payload = webhooks.payload(job)

    assert job.status is JobStatus.FAILED and (job.api, job.api_data) == (
        BFL_API,
        {"webhook_secret": None},
    )
    assert (payload["status"], payload["error"], payload["message"]) == (
        "Error",
        "internal_error",
        "boom",
    )
    assert webhooks.headers(job, b"{}") == {}  # no secret: no X-BFL-Signature


def test_fal_jobs_keep_fals_webhook_body(
    client: TestClient, app: Any, worker: PlayedWorker
) -> None:
    response = client.post(
        f"/{MAX}",
        json={
            "prompt": "p",
            "image_url": tiny_png_data_uri(),
            "bfl_api": {"webhook_secret": "x"},  # where older versions kept it
            "api": BFL_API,
            "api_data": {"webhook_secret": "x"},
        },
    )
    job = app.state.context.service.get(response.json()["request_id"])

    assert (job.api, job.api_data) == (None, None)  # a fal caller cannot pose as a BFL job
    assert "request_id" in app.state.services.webhooks.payload(job)
