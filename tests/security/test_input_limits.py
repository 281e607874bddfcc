"""Every input limit answers with the limit in its message: body size (413), prompt length,
images per request and bytes per image (422), SSE status streams per key (429)."""

from __future__ import annotations

import base64
import contextlib
import time

import httpx
import pytest
from http_support import LOOPBACK, MAX, MULTI, AppFactory, LiveServer, edit_body, submit
from starlette.testclient import TestClient

from kontext_server.core.auth import create_api_key
from kontext_server.http.fal.schemas import MAX_IMAGE_URLS, PROMPT_MAX_CHARS
from kontext_server.store.sqlite import SQLiteJobStore


def _detail(response: httpx.Response) -> str:
    return str(response.json()["detail"])


def test_a_body_over_the_limit_is_413_naming_the_limit(make_app: AppFactory) -> None:
    # max_image_bytes=1000 -> 2 * (1000 * 4 // 3 + 1024) + 64 KiB = 70250 bytes of body
    with TestClient(make_app(max_image_bytes=1000), client=LOOPBACK) as client:
        body = edit_body(prompt="x" * 200_000)
        response = client.post(f"/{MAX}", json=body)
    assert response.status_code == 413
    assert "larger than 70250 bytes" in _detail(response)


def test_a_prompt_over_the_limit_is_422_naming_the_limit(make_app: AppFactory) -> None:
    with TestClient(make_app(), client=LOOPBACK) as client:
        response = client.post(f"/{MAX}", json=edit_body(prompt="x" * (PROMPT_MAX_CHARS + 1)))
    assert response.status_code == 422
    assert f"at most {PROMPT_MAX_CHARS} characters" in response.text


def test_too_many_images_is_422_naming_the_limit(make_app: AppFactory) -> None:
    urls = [f"https://example.com/{n}.png" for n in range(MAX_IMAGE_URLS + 1)]
    with TestClient(make_app(), client=LOOPBACK) as client:
        response = client.post(f"/{MULTI}", json={"prompt": "merge", "image_urls": urls})
    assert response.status_code == 422
    assert str(MAX_IMAGE_URLS) in response.text


def test_an_inline_image_over_the_byte_limit_is_422_naming_the_limit(
    make_app: AppFactory,
) -> None:
    uri = "data:image/png;base64," + base64.b64encode(b"\0" * 3000).decode()
    with TestClient(make_app(max_image_bytes=2048), client=LOOPBACK) as client:
        response = client.post(f"/{MAX}", json=edit_body(image_url=uri))
    assert response.status_code == 422
    assert "more than the 2 KiB limit for an input image" in response.text


# --- SSE streams per key -----------------------------------------------------------------------


def _open_stream(
    stack: contextlib.ExitStack, client: httpx.Client, url: str, key: str
) -> httpx.Response:
    return stack.enter_context(client.stream("GET", url, headers={"Authorization": f"Key {key}"}))


@pytest.mark.timeout(60)
def test_streams_past_the_per_key_limit_get_a_429_until_one_closes(
    make_app: AppFactory, store: SQLiteJobStore
) -> None:
    alice, bob = create_api_key(store, "alice")[1], create_api_key(store, "bob")[1]
    app = make_app(max_streams_per_key=2)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        auth = {"Authorization": f"Key {alice}"}
        answer = client.post(f"/{MAX}", json=edit_body(), headers=auth).json()
        stream_url = answer["status_url"] + "/stream"
        with contextlib.ExitStack() as streams:
            first = _open_stream(streams, client, stream_url, alice)
            _open_stream(streams, client, stream_url, alice)
            assert first.status_code == 200

            refused = client.get(stream_url, headers=auth)

            assert refused.status_code == 429
            assert refused.headers["retry-after"]
            assert "already has 2 open status streams (limit 2)" in _detail(refused)
            bob_answer = client.post(
                f"/{MAX}", json=edit_body(), headers={"Authorization": f"Key {bob}"}
            ).json()
            with client.stream(
                "GET", bob_answer["status_url"] + "/stream", headers={"Authorization": f"Key {bob}"}
            ) as other_key:
                assert other_key.status_code == 200
            first.close()  # the client goes away: its slot comes back
            assert _eventually_status(client, stream_url, alice) == 200


def _eventually_status(client: httpx.Client, url: str, key: str) -> int:
    deadline = time.monotonic() + 5
    while True:
        with client.stream("GET", url, headers={"Authorization": f"Key {key}"}) as response:
            if response.status_code != 429 or time.monotonic() > deadline:
                return response.status_code
        time.sleep(0.05)


def test_a_finished_stream_gives_its_slot_back(make_app: AppFactory, store: SQLiteJobStore) -> None:
    app = make_app(max_streams_per_key=1)
    with TestClient(app, client=LOOPBACK) as client:
        answer = submit(client)
        client.put(answer["cancel_url"])  # final: the stream ends after one event
        for _ in range(3):
            response = client.get(answer["status_url"] + "/stream")
            assert response.status_code == 200 and "data:" in response.text
        assert app.state.context.stream_slots.open_streams(None) == 0
