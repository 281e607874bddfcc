"""WebhookDispatcher: a real SQLite outbox, a real receiver on 127.0.0.1, real signatures."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kontext_server.domain.editing import EditInput
from kontext_server.domain.jobs import Job, JobStatus, NewJob
from kontext_server.net.fetch import SafeFetcher
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.webhooks.delivery import (
    WebhookDispatcher,
    default_backoff_s,
    webhook_body,
)
from kontext_server.webhooks.signing import WebhookSigner

START = 1_700_000_000.0
RESULT = {"images": [{"url": "http://x/y.jpeg", "width": 8, "height": 8}], "seed": 1}


class DeliveryClock:
    """Unix seconds that move only when a test says so (shared by store and dispatcher)."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1 that answers with scripted statuses (then 200)."""

    statuses: list[int] = field(default_factory=list)
    received: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0
    delay_s: float = 0.0

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def next_status(self) -> int:
        return self.statuses.pop(0) if self.statuses else 200


def _receiver_handler(receiver: Receiver) -> type[http.server.BaseHTTPRequestHandler]:
    class ReceiverHandler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            receiver.received.append((self.path, dict(self.headers.items()), body))
            time.sleep(receiver.delay_s if self.path == "/slow" else 0.0)
            status = receiver.next_status()
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", receiver.url("/redirected"))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    return ReceiverHandler


@pytest.fixture
def webhook_receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _receiver_handler(receiver))
    httpd.daemon_threads = True
    httpd.block_on_close = False
    receiver.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield receiver
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def delivery_clock() -> DeliveryClock:
    return DeliveryClock()


@pytest.fixture
def delivery_store(tmp_path: Path, delivery_clock: DeliveryClock) -> Iterator[SQLiteJobStore]:
    store = SQLiteJobStore(tmp_path / "jobs.db", clock=delivery_clock)
    yield store
    store.close()


@pytest.fixture
def delivery_signer(tmp_path: Path) -> WebhookSigner:
    return WebhookSigner.load_or_create(tmp_path / "webhook.pem")


def fal_payload(job: Job) -> dict[str, Any]:
    """A stand-in for QueueService.webhook_payload."""
    if job.status is JobStatus.SUCCEEDED:
        return {"request_id": job.id, "status": "OK", "payload": job.result}
    return {"request_id": job.id, "status": "ERROR", "error": job.error, "payload": None}


def make_dispatcher(
    store: SQLiteJobStore,
    signer: WebhookSigner,
    clock: DeliveryClock,
    *,
    allow_hosts: tuple[str, ...] = ("127.0.0.1",),
    timeout_s: float = 5.0,
    **options: Any,
) -> WebhookDispatcher:
    fetcher = SafeFetcher(
        allow_hosts=list(allow_hosts),
        allow_ports=[80, 443],
        timeout_s=timeout_s,
        max_bytes=1024,
        max_redirects=0,
    )
    return WebhookDispatcher(
        store, signer, fetcher, fal_payload, claimer_id="api-test", clock=clock, **options
    )


def finished_job(store: SQLiteJobStore, webhook_url: str, owner: str | None = "key-1") -> Job:
    """A job that succeeded, which puts one row in the outbox."""
    new = NewJob(
        id=str(uuid.uuid4()),
        endpoint="fal-ai/flux-pro/kontext/max",
        input=EditInput(prompt="make it blue", references=("https://example.com/a.png",)),
        owner=owner,
        webhook_url=webhook_url,
    )
    store.submit(new)
    claimed = store.claim("worker-1", lease_s=30)
    assert claimed is not None
    assert store.finish(
        claimed.id, "worker-1", claimed.attempts, JobStatus.SUCCEEDED, result=RESULT
    )
    job = store.get(claimed.id)
    assert job is not None
    return job


def verifies_like_a_receiver(jwks: dict[str, Any], headers: dict[str, str], body: bytes) -> bool:
    message = "\n".join(
        [
            headers["X-Fal-Webhook-Request-Id"],
            headers["X-Fal-Webhook-User-Id"],
            headers["X-Fal-Webhook-Timestamp"],
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode()
    x = jwks["keys"][0]["x"]
    key = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "=" * (-len(x) % 4)))
    with contextlib.suppress(Exception):
        key.verify(bytes.fromhex(headers["X-Fal-Webhook-Signature"]), message)
        return True
    return False


def test_webhook_is_delivered_signed_with_fal_payload(
    delivery_store: SQLiteJobStore,
    delivery_signer: WebhookSigner,
    delivery_clock: DeliveryClock,
    webhook_receiver: Receiver,
) -> None:
    job = finished_job(delivery_store, webhook_receiver.url())
    dispatcher = make_dispatcher(delivery_store, delivery_signer, delivery_clock)
    assert dispatcher.run_once() == 1
    [(path, headers, body)] = webhook_receiver.received
    assert path == "/hook"
    assert json.loads(body) == fal_payload(job)
    assert b" " not in body  # compact JSON
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Fal-Webhook-Request-Id"] == job.id
    assert headers["X-Fal-Webhook-User-Id"] == "key-1"
    assert verifies_like_a_receiver(delivery_signer.jwks(), headers, body)
    delivery_clock.advance(10 * 3600)
    assert dispatcher.run_once() == 0  # delivered once, never again


def test_job_without_owner_is_signed_as_anonymous(
    delivery_store: SQLiteJobStore,
    delivery_signer: WebhookSigner,
    delivery_clock: DeliveryClock,
    webhook_receiver: Receiver,
) -> None:
    finished_job(delivery_store, webhook_receiver.url(), owner=None)
    make_dispatcher(delivery_store, delivery_signer, delivery_clock).run_once()
    [(_, headers, body)] = webhook_receiver.received
    assert headers["X-Fal-Webhook-User-Id"] == "anonymous"
    assert verifies_like_a_receiver(delivery_signer.jwks(), headers, body)


def test_receiver_answering_500_then_200_gets_the_webhook_on_retry(
    delivery_store: SQLiteJobStore,
    delivery_signer: WebhookSigner,
    delivery_clock: DeliveryClock,
    webhook_receiver: Receiver,
) -> None:
    webhook_receiver.statuses = [500]
    finished_job(delivery_store, webhook_receiver.url())
    dispatcher = make_dispatcher(delivery_store, delivery_signer, delivery_clock)
    assert dispatcher.run_once() == 1
    assert dispatcher.run_once() == 0  # not due yet
    delivery_clock.advance(default_backoff_s(1))
    assert dispatcher.run_once() == 1
    assert len(webhook_receiver.received) == 2
    first, second = (body for _, _, body in webhook_receiver.received)
    assert first == second
    delivery_clock.advance(10 * 3600)
    assert dispatcher.run_once() == 0


def test_redirect_is_not_followed_and_counts_as_a_failed_attempt(
    delivery_store: SQLiteJobStore,
    delivery_signer: WebhookSigner,
    delivery_clock: DeliveryClock,
    webhook_receiver: Receiver,
) -> None:
    webhook_receiver.statuses = [302]
    finished_job(delivery_store, webhook_receiver.url())
    dispatcher = make_dispatcher(delivery_store, delivery_signer, delivery_clock)
    assert dispatcher.run_once() == 1
    assert [path for path, _, _ in webhook_receiver.received] == ["/hook"]
    delivery_clock.advance(default_backoff_s(1))
    [retry] = delivery_store.claim_webhooks("someone", limit=10, lease_s=60)
    assert retry.attempts == 1


def test_delivery_is_given_up_after_max_attempts(
    delivery_store: SQLiteJobStore,
    delivery_signer: WebhookSigner,
    delivery_clock: DeliveryClock,
    webhook_receiver: Receiver,
) -> None:
    webhook_receiver.statuses = [503] * 10
    finished_job(delivery_store, webhook_receiver.url())
    dispatcher = make_dispatcher(
        delivery_store, delivery_signer, delivery_clock, max_attempts=3, backoff_s=lambda n: 5.0
    )
    for _ in range(5):
        dispatcher.run_once()
        delivery_clock.advance(5)
    assert len(webhook_receiver.received) == 3
    assert delivery_store.claim_webhooks("someone", limit=10, lease_s=60) == []


def test_unreachable_receiver_is_retried_later(
    delivery_store: SQLiteJobStore, delivery_signer: WebhookSigner, delivery_clock: DeliveryClock
) -> None:
    with socket_port_that_refuses() as port:
        finished_job(delivery_store, f"http://127.0.0.1:{port}/hook")
        dispatcher = make_dispatcher(delivery_store, delivery_signer, delivery_clock)
        assert dispatcher.run_once() == 1
    delivery_clock.advance(default_backoff_s(1))
    [retry] = delivery_store.claim_webhooks("someone", limit=10, lease_s=60)
    assert retry.attempts == 1


def test_forbidden_webhook_url_is_given_up_at_once(
    delivery_store: SQLiteJobStore,
    delivery_signer: WebhookSigner,
    delivery_clock: DeliveryClock,
    webhook_receiver: Receiver,
) -> None:
    finished_job(delivery_store, webhook_receiver.url())
    dispatcher = make_dispatcher(delivery_store, delivery_signer, delivery_clock, allow_hosts=())
    assert dispatcher.run_once() == 1
    assert webhook_receiver.received == []
    delivery_clock.advance(10 * 3600)
    assert dispatcher.run_once() == 0


def test_failing_payload_builder_counts_as_an_attempt(
    delivery_store: SQLiteJobStore,
    delivery_signer: WebhookSigner,
    delivery_clock: DeliveryClock,
    webhook_receiver: Receiver,
) -> None:
    finished_job(delivery_store, webhook_receiver.url())
    fetcher = SafeFetcher(allow_hosts=["127.0.0.1"], allow_ports=[], timeout_s=5, max_bytes=1)

    def broken_payload(job: Job) -> dict[str, Any]:
        raise RuntimeError("files are unreachable")

    dispatcher = WebhookDispatcher(
        delivery_store,
        delivery_signer,
        fetcher,
        broken_payload,
        claimer_id="api",
        clock=delivery_clock,
    )
    assert dispatcher.run_once() == 1
    delivery_clock.advance(default_backoff_s(1))
    [retry] = delivery_store.claim_webhooks("someone", limit=10, lease_s=60)
    assert retry.attempts == 1


def test_slow_receiver_does_not_hold_up_the_others(
    delivery_store: SQLiteJobStore,
    delivery_signer: WebhookSigner,
    delivery_clock: DeliveryClock,
    webhook_receiver: Receiver,
) -> None:
    webhook_receiver.delay_s = 2.0
    finished_job(delivery_store, webhook_receiver.url("/slow"))
    finished_job(delivery_store, webhook_receiver.url("/fast"))
    dispatcher = make_dispatcher(delivery_store, delivery_signer, delivery_clock, timeout_s=0.5)
    start = time.monotonic()
    assert dispatcher.run_once() == 2
    assert time.monotonic() - start < 1.5  # the slow one timed out; both ran side by side
    assert sorted(path for path, _, _ in webhook_receiver.received) == ["/fast", "/slow"]
    delivery_clock.advance(default_backoff_s(1))
    [retry] = delivery_store.claim_webhooks("someone", limit=10, lease_s=60)
    assert retry.url.endswith("/slow")


def test_run_forever_delivers_until_stopped(
    delivery_store: SQLiteJobStore,
    delivery_signer: WebhookSigner,
    delivery_clock: DeliveryClock,
    webhook_receiver: Receiver,
) -> None:
    dispatcher = make_dispatcher(delivery_store, delivery_signer, delivery_clock, poll_s=0.02)
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run_forever, args=(stop,))
    thread.start()
    try:
        job = finished_job(delivery_store, webhook_receiver.url())
        deadline = time.monotonic() + 5
        while not webhook_receiver.received and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(2)
    assert not thread.is_alive()
    assert webhook_receiver.received[0][1]["X-Fal-Webhook-Request-Id"] == job.id


def test_run_forever_survives_a_failing_store(
    delivery_signer: WebhookSigner, delivery_clock: DeliveryClock, tmp_path: Path
) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.db", clock=delivery_clock)
    dispatcher = make_dispatcher(store, delivery_signer, delivery_clock, poll_s=0.01)
    store.close()  # whatever the dispatcher asks of it now raises
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run_forever, args=(stop,))
    thread.start()
    time.sleep(0.1)
    assert thread.is_alive()
    stop.set()
    thread.join(2)
    assert not thread.is_alive()


def test_default_backoff_spreads_ten_attempts_over_about_two_hours() -> None:
    waits = [default_backoff_s(n) for n in range(1, 10)]
    assert waits[0] == 15
    assert waits == sorted(waits)
    assert 1.75 * 3600 <= sum(waits) <= 2.25 * 3600


def test_unserialisable_output_becomes_payload_error() -> None:
    body = json.loads(
        webhook_body({"request_id": "r", "status": "OK", "payload": {"x": float("nan")}})
    )
    assert body["payload"] is None
    assert body["request_id"] == "r"
    assert "cannot be serialised" in body["payload_error"]


@contextlib.contextmanager
def socket_port_that_refuses() -> Iterator[int]:
    """A loopback port with nothing listening (bound, never listened on)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
