"""The status stream (§5) and sync runs under /run/, over real loopback HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from http_support import MAX, LiveServer, PlayedWorker, edit_body

from kontext_server.store.sqlite import SQLiteJobStore


def later(delay_s: float, action: Callable[[], Any]) -> threading.Thread:
    """Run ``action`` on a thread after ``delay_s`` (the played worker works meanwhile)."""

    def run() -> None:
        time.sleep(delay_s)
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_until_claimable(store: SQLiteJobStore, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while store.queue_depth() == 0:
        assert time.monotonic() < deadline, "nothing was queued"
        time.sleep(0.01)


def read_stream(url: str, params: dict[str, str] | None = None) -> list[str]:
    """Every SSE line (data and comments) until the server closes the stream."""
    lines: list[str] = []
    with httpx.stream("GET", url, params=params, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-fal-request-id"]
        lines.extend(line for line in response.iter_lines() if line)
    return lines


def data_events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data:")]


def play_a_run(worker: PlayedWorker) -> None:
    worker.claim()
    worker.progress(1, 2)
    time.sleep(0.1)
    worker.progress(2, 2)
    time.sleep(0.1)
    worker.succeed()


def test_stream_sends_each_change_and_closes_after_completed(
    live_server: LiveServer, worker: PlayedWorker
) -> None:
    answer = httpx.post(f"{live_server.url}/{MAX}", json=edit_body()).json()
    player = later(0.3, lambda: play_a_run(worker))

    lines = read_stream(f"{answer['status_url']}/stream")

    player.join()
    events = data_events(lines)
    statuses = [event["status"] for event in events]
    assert statuses[0] == "IN_QUEUE"
    assert "IN_PROGRESS" in statuses
    assert statuses[-1] == "COMPLETED"
    assert statuses.count("COMPLETED") == 1
    assert lines[-1].startswith("data:"), "the stream must end right after COMPLETED"
    progress = [event["progress"] for event in events if "progress" in event]
    assert {"step": 2, "total": 2} in progress
    assert events[-1]["metrics"] == {"inference_time": 1.25}


def test_stream_sends_keepalive_comments_while_nothing_changes(
    live_server: LiveServer, worker: PlayedWorker
) -> None:
    answer = httpx.post(f"{live_server.url}/{MAX}", json=edit_body()).json()
    player = later(0.7, lambda: (worker.claim(), worker.succeed()))

    lines = read_stream(f"{answer['status_url']}/stream")

    player.join()
    assert ": keepalive" in lines


def test_stream_with_logs_sends_each_new_log_line_once(
    live_server: LiveServer, worker: PlayedWorker
) -> None:
    answer = httpx.post(f"{live_server.url}/{MAX}", json=edit_body()).json()
    player = later(0.2, lambda: play_a_run(worker))

    lines = read_stream(f"{answer['status_url']}/stream", params={"logs": "1"})

    player.join()
    messages = [entry["message"] for event in data_events(lines) for entry in event["logs"]]
    assert messages.count("step 1/2") == 1
    assert messages.count("step 2/2") == 1


def test_stream_of_an_unknown_request_is_a_404(live_server: LiveServer) -> None:
    response = httpx.get(f"{live_server.url}/fal-ai/flux-pro/requests/nope/status/stream")

    assert response.status_code == 404


def test_sync_run_answers_the_output(
    live_server: LiveServer, worker: PlayedWorker, store: SQLiteJobStore
) -> None:
    player = later(0, lambda: (wait_until_claimable(store), play_a_run(worker)))

    response = httpx.post(f"{live_server.url}/run/{MAX}", json=edit_body(), timeout=10)

    player.join()
    assert response.status_code == 200
    output = response.json()
    assert output["images"][0]["url"].startswith(f"{live_server.url}/files/")
    assert response.headers["x-fal-request-id"]
    assert httpx.get(output["images"][0]["url"]).headers["content-type"] == "image/jpeg"


def test_sync_run_answers_the_error_with_its_status_code(
    live_server: LiveServer, worker: PlayedWorker, store: SQLiteJobStore
) -> None:
    def fail() -> None:
        wait_until_claimable(store)
        worker.claim()
        worker.fail("not an image", "image_load_error")

    player = later(0, fail)

    response = httpx.post(f"{live_server.url}/run/{MAX}", json=edit_body(), timeout=10)

    player.join()
    assert response.status_code == 422
    assert response.json() == {"detail": "not an image", "error_type": "image_load_error"}


def test_sync_run_validates_like_submit(live_server: LiveServer) -> None:
    response = httpx.post(f"{live_server.url}/run/{MAX}", json=edit_body(aspect_ratio="string"))

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "aspect_ratio"]


def test_a_sync_run_client_that_hangs_up_cancels_its_request(
    live_server: LiveServer, store: SQLiteJobStore
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_server.url}/run/{MAX}", json=edit_body(), timeout=0.3)

    deadline = time.monotonic() + 5
    while store.queue_depth() > 0:
        assert time.monotonic() < deadline, "the abandoned run is still queued"
        time.sleep(0.02)
