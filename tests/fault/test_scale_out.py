"""Process roles (issue 4 item 3): two ``serve --workers 0`` API processes and a separate
``kontext-server worker --model tiny`` on one PostgreSQL + S3. A request submitted on API A
is followed on API B (status, status stream, result, its S3 link), and its webhook is
delivered exactly once although both API processes run a webhook dispatcher."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fault_support import (
    ENDPOINT,
    ApiProcess,
    Backend,
    Processes,
    WorkerProcess,
    input_image_uri,
    on_base,
)

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that answers 200 and records every body it is sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def stream_events(client: httpx.Client, url: str) -> Iterator[dict[str, Any]]:
    with client.stream("GET", url, params={"logs": "1"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                yield json.loads(line.removeprefix("data:"))


def test_a_request_submitted_on_one_api_process_is_followed_and_delivered_through_another(
    pg_backend: Backend, processes: Processes, tmp_path: Path
) -> None:
    env = {"KONTEXT_FETCH_ALLOW_HOSTS": "127.0.0.1"}  # the webhook receiver is on loopback
    api_a = ApiProcess(pg_backend, tmp_path / "api-a", env=env)
    api_b = ApiProcess(pg_backend, tmp_path / "api-b", env=env)
    worker = WorkerProcess(pg_backend, tmp_path, "gpu0", engine=None, steps=2)
    for process in (worker, api_a, api_b):  # the worker loads torch while the APIs start
        processes.add(process)
        process.spawn() if process is worker else process.start()  # type: ignore[func-returns-value]

    with WebhookReceiver() as receiver, httpx.Client(timeout=30.0) as client:
        answer = client.post(
            f"{api_a.base_url}/{ENDPOINT}",
            params={"fal_webhook": receiver.url},
            json={"prompt": "scale out", "image_url": input_image_uri(64)},
        )
        assert answer.status_code == 200, answer.text
        submitted = answer.json()
        status_on_b = on_base(submitted["status_url"], api_b.base_url)
        events = list(stream_events(client, f"{status_on_b}/stream"))
        status = client.get(status_on_b).json()
        result = client.get(on_base(submitted["response_url"], api_b.base_url))
        assert result.status_code == 200, f"{result.text}\n{processes.logs()}"
        image = client.get(result.json()["images"][0]["url"])
        deadline = time.monotonic() + 10
        while not receiver.bodies and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)  # both dispatchers poll every 0.5 s: a second delivery would be here

    assert events[-1]["status"] == "COMPLETED", events
    assert {e["status"] for e in events} <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    assert status["status"] == "COMPLETED" and status.get("error") is None, status
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content[:3] == b"\xff\xd8\xff"
    assert len(receiver.bodies) == 1, receiver.bodies
    delivered = receiver.bodies[0]
    assert delivered["request_id"] == submitted["request_id"]
    assert delivered["status"] == "OK", delivered
    assert len(delivered["payload"]["images"]) == 1
