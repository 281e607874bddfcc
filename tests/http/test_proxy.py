"""``/proxy``: requests the JS client sends in proxy mode (its fal URL in ``x-fal-target-url``)
are answered by our own routes, in-process; other targets are refused."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from http_support import LOOPBACK, MAX, PlayedWorker, edit_body
from starlette.testclient import TestClient

from kontext_server.core.auth import create_api_key
from kontext_server.http.fal.proxy import ProxyTargetError, route_target
from kontext_server.store.sqlite import SQLiteJobStore

QUEUE = "https://queue.fal.run"


def proxied(
    client: TestClient,
    method: str,
    target: str,
    *,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """What the JS client sends in proxy mode: the same request, at /proxy, plus the header."""
    all_headers = {"x-fal-target-url": target, **(headers or {})}
    return client.request(method, "/proxy", headers=all_headers, **kwargs)


def test_submit_status_result_and_cancel_through_the_proxy(
    client: TestClient, worker: PlayedWorker
) -> None:
    submitted = proxied(client, "POST", f"{QUEUE}/{MAX}", json=edit_body(seed=7))
    assert submitted.status_code == 200, submitted.text
    request_id = submitted.json()["request_id"]
    base = f"{QUEUE}/fal-ai/flux-pro/requests/{request_id}"

    queued = proxied(client, "GET", f"{base}/status?logs=1")
    worker.claim()
    worker.succeed()
    done = proxied(client, "GET", f"{base}/status?logs=1")
    result = proxied(client, "GET", base)
    cancel = proxied(client, "PUT", f"{base}/cancel")

    assert queued.status_code == 202
    assert queued.json()["status"] == "IN_QUEUE"
    assert done.json()["status"] == "COMPLETED"
    assert isinstance(done.json()["logs"], list)
    assert result.status_code == 200
    image_url = result.json()["images"][0]["url"]
    assert image_url.startswith("http://testserver/files/")  # our own host, fetched directly
    assert client.get(image_url).status_code == 200
    assert cancel.status_code == 400
    assert cancel.json() == {"status": "ALREADY_COMPLETED"}


def test_the_status_stream_passes_through_the_proxy(
    client: TestClient, worker: PlayedWorker
) -> None:
    request_id = proxied(client, "POST", f"{QUEUE}/{MAX}", json=edit_body()).json()["request_id"]
    worker.claim()
    worker.succeed()

    stream = proxied(client, "GET", f"{QUEUE}/fal-ai/flux-pro/requests/{request_id}/status/stream")

    assert stream.headers["content-type"].startswith("text/event-stream")
    events = [
        json.loads(line[len("data: ") :])
        for line in stream.text.splitlines()
        if line.startswith("data: ")
    ]
    assert events[-1]["status"] == "COMPLETED"


def test_validation_errors_come_back_unchanged(client: TestClient) -> None:
    response = proxied(client, "POST", f"{QUEUE}/{MAX}", json=edit_body(aspect_ratio="x"))

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == "aspect_ratio"


def test_storage_initiate_goes_through_the_proxy(client: TestClient) -> None:
    response = proxied(
        client,
        "POST",
        "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3",
        json={"content_type": "image/png", "file_name": "a.png"},
    )

    assert response.status_code == 200, response.text
    upload_url = response.json()["upload_url"]
    assert upload_url.startswith("http://testserver/cdn/uploads/")
    assert client.put(upload_url, content=b"png").status_code == 200


def test_the_run_host_maps_to_run(client: TestClient, worker: PlayedWorker) -> None:
    # A sync run waits for the end; a refused input answers at once, which is enough to see
    # that /run/ (not the queue) answered: the queue would accept and queue it.
    response = proxied(client, "POST", f"https://fal.run/{MAX}", json={"prompt": "x"})

    assert response.status_code == 422


def test_the_proxy_keeps_authentication(app: FastAPI, store: SQLiteJobStore) -> None:
    _, key = create_api_key(store, "alice")
    with TestClient(app, client=LOOPBACK) as client:
        anonymous = proxied(client, "POST", f"{QUEUE}/{MAX}", json=edit_body())
        with_key = proxied(
            client,
            "POST",
            f"{QUEUE}/{MAX}",
            json=edit_body(),
            headers={"Authorization": f"Key {key}"},
        )

    assert anonymous.status_code == 401
    assert with_key.status_code == 200


@pytest.mark.parametrize(
    "target",
    [
        None,
        "https://example.com/fal-ai/flux-pro/kontext/max",
        "https://queue.fal.run.evil.com/x",
        "https://queue.fal.run:8443/x",
        "https://user@queue.fal.run/x",
        "ftp://queue.fal.run/x",
        "https://queue.fal.run/proxy",
        "https://queue.fal.run/files/../proxy",
        "https://queue.fal.run/files/%2e%2e/x",
    ],
)
def test_other_targets_are_refused_with_what_is_allowed(
    client: TestClient, target: str | None
) -> None:
    headers = {} if target is None else {"x-fal-target-url": target}

    response = client.post("/proxy", headers=headers, json={})

    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "x-fal-target-url" in detail


def test_fal_hosts_map_to_our_prefixes() -> None:
    assert route_target("https://queue.fal.run/a/b?logs=1").path == "/a/b"
    assert route_target("https://queue.fal.run/a/b?logs=1").query == "logs=1"
    assert route_target("https://fal.run/a/b").path == "/run/a/b"
    assert route_target("https://rest.fal.ai/storage/x").path == "/rest/storage/x"
    assert route_target("https://v3b.fal.media/files/upload").path == "/cdn/files/upload"
    with pytest.raises(ProxyTargetError, match=r"rest\.fal\.ai"):
        route_target("https://example.com/")
