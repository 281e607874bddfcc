"""Webhook wiring (outbox row on completion, delivery by the app's dispatcher), the JWKS route,
the files route and CORS."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import FastAPI
from http_support import LOOPBACK, MAX, LiveServer, PlayedWorker, edit_body, submit
from starlette.testclient import TestClient

from kontext_server.config import Settings
from kontext_server.domain.jobs import JobStatus
from kontext_server.files.local import LocalFileStore
from kontext_server.http.app import create_app
from kontext_server.http.webhooks import JobWebhooks
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.webhooks.signing import WebhookSigner


class Receiver:
    """A webhook receiver on 127.0.0.1 that records what it is sent."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.arrived = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append((dict(self.headers), body))
                self.send_response(200)
                self.end_headers()
                receiver.arrived.set()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


def allowing_receiver_port(settings: Settings, receiver: Receiver) -> Settings:
    port = int(receiver.url.split(":")[2].split("/")[0])
    return settings.model_copy(update={"fetch_allow_ports": [*settings.fetch_allow_ports, port]})


def test_a_finished_request_with_a_webhook_leaves_an_outbox_row(
    client: TestClient, worker: PlayedWorker, store: SQLiteJobStore
) -> None:
    answer = submit(client, params={"fal_webhook": "https://hooks.example.com/done?x=1"})
    assert store.claim_webhooks("probe", limit=10, lease_s=0.01) == []
    worker.claim()
    worker.succeed()

    deliveries = store.claim_webhooks("probe", limit=10, lease_s=30)

    assert [(d.job_id, d.url) for d in deliveries] == [
        (answer["request_id"], "https://hooks.example.com/done?x=1")
    ]


def test_the_apps_dispatcher_delivers_the_webhook_to_the_receiver(
    settings: Settings,
    store: SQLiteJobStore,
    files: LocalFileStore,
    signer: WebhookSigner,
    worker: PlayedWorker,
    receiver: Receiver,
) -> None:
    app = create_app(allowing_receiver_port(settings, receiver), store, files, signer=signer)
    with LiveServer(app) as server:
        answer = httpx.post(
            f"{server.url}/{MAX}", params={"fal_webhook": receiver.url}, json=edit_body()
        ).json()
        jwks = httpx.get(f"{server.url}/.well-known/jwks.json").json()
        worker.claim()
        worker.succeed()
        assert receiver.arrived.wait(10), "no webhook arrived"

    headers, raw_body = receiver.received[0]
    body = json.loads(raw_body)
    assert body["request_id"] == answer["request_id"]
    assert body["gateway_request_id"] == answer["request_id"]
    assert body["status"] == "OK"
    assert body["payload"]["images"][0]["url"].startswith(f"{server.url}/files/")
    assert "file_key" not in body["payload"]["images"][0]
    assert headers["X-Fal-Webhook-Request-Id"] == answer["request_id"]
    assert_signed_by_published_key(headers, raw_body, jwks)


def assert_signed_by_published_key(headers: dict[str, str], body: bytes, jwks: Any) -> None:
    """Verify as a receiver would: the JWKS key over id, user, timestamp and body hash."""
    x = jwks["keys"][0]["x"]
    public_key = Ed25519PublicKey.from_public_bytes(
        base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
    )
    message = "\n".join(
        [
            headers["X-Fal-Webhook-Request-Id"],
            headers["X-Fal-Webhook-User-Id"],
            headers["X-Fal-Webhook-Timestamp"],
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode()
    public_key.verify(bytes.fromhex(headers["X-Fal-Webhook-Signature"]), message)


def test_webhook_payload_of_a_failure_is_an_error_body(
    client: TestClient, worker: PlayedWorker, store: SQLiteJobStore, app: Any
) -> None:
    answer = submit(client)
    worker.claim()
    worker.fail("cannot decode the image", "image_load_error")
    job = store.get(answer["request_id"])
    assert job is not None
    webhooks: JobWebhooks = app.state.services.webhooks

    assert webhooks.payload(job) == {
        "request_id": job.id,
        "gateway_request_id": job.id,
        "status": "ERROR",
        "error": "cannot decode the image",
        "payload": {"detail": "cannot decode the image", "error_type": "image_load_error"},
    }


def test_webhook_payload_reports_an_output_that_cannot_be_rendered(
    client: TestClient, worker: PlayedWorker, store: SQLiteJobStore, app: Any
) -> None:
    answer = submit(client)
    worker.claim()
    worker._finish(JobStatus.SUCCEEDED, result={"images": "not a list of images"})
    job = store.get(answer["request_id"])
    assert job is not None

    payload = app.state.services.webhooks.payload(job)

    assert payload["status"] == "OK"
    assert payload["payload"] is None
    assert payload["payload_error"]


def test_jwks_publishes_the_signing_key(client: TestClient, signer: WebhookSigner) -> None:
    response = client.get("/.well-known/jwks.json")

    assert response.status_code == 200
    assert response.json() == signer.jwks()
    assert response.json()["keys"][0]["crv"] == "Ed25519"


def test_files_are_served_with_their_content_type_and_unknown_ones_are_404(
    client: TestClient, files: LocalFileStore
) -> None:
    stored = files.put("abcdEFGH1234/1-0.jpeg", b"\xff\xd8\xff\xe0jpeg", "image/jpeg")

    served = client.get(f"/files/{stored.key}")

    assert served.status_code == 200
    assert served.headers["content-type"] == "image/jpeg"
    assert served.content == b"\xff\xd8\xff\xe0jpeg"
    assert client.get("/files/abcdEFGH1234/2-0.jpeg").status_code == 404
    assert client.get("/files/..%2F..%2Fjobs.db").status_code == 404


def test_files_answer_head_with_their_headers_and_no_body(
    client: TestClient, files: LocalFileStore
) -> None:
    stored = files.put("abcdEFGH1234/1-0.png", b"\x89PNG\r\n\x1a\npng", "image/png")

    head = client.head(f"/files/{stored.key}")

    assert head.status_code == 200
    assert head.headers["content-type"] == "image/png"
    assert head.headers["content-length"] == "11"
    assert head.content == b""
    assert client.head("/files/abcdEFGH1234/2-0.png").status_code == 404


def test_the_openapi_document_has_unique_operation_ids(app: FastAPI) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FastAPI warns about a duplicate operation id
        document = app.openapi()

    operation_ids = [
        operation["operationId"]
        for path in document["paths"].values()
        for operation in path.values()
    ]
    assert len(operation_ids) == len(set(operation_ids))


def test_cors_preflight_allows_fal_headers_and_exposes_the_request_id(
    client: TestClient,
) -> None:
    preflight = client.options(
        f"/{MAX}",
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-fal-queue-priority",
        },
    )
    assert preflight.status_code == 200
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert "x-fal-queue-priority" in allowed
    assert "authorization" in allowed

    answer = client.post(f"/{MAX}", json=edit_body(), headers={"Origin": "https://app.example.com"})
    assert "x-fal-request-id" in answer.headers["access-control-expose-headers"]


def test_the_maintenance_loop_runs_while_the_app_serves(
    settings: Settings,
    store: SQLiteJobStore,
    files: LocalFileStore,
    signer: WebhookSigner,
) -> None:
    app = create_app(settings, store, files, signer=signer, maintenance_interval_s=0.05)
    with TestClient(app, client=LOOPBACK) as client:
        answer = submit(client, headers={"X-Fal-Request-Timeout": "0.05"})
        deadline = time.monotonic() + 5
        while client.get(answer["status_url"]).json()["status"] != "COMPLETED":
            assert time.monotonic() < deadline, "the start deadline was never enforced"
            time.sleep(0.05)
    assert client.get(answer["response_url"]).status_code == 504


def test_the_openapi_document_builds(client: TestClient) -> None:
    response = client.get("/openapi.json")

    assert response.status_code == 200
    assert "/run/{endpoint}" in response.json()["paths"]
