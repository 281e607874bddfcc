"""End to end: ``kontext-server serve`` (API only) + ``kontext-server worker --engine bfl``
processes against the stand-in BFL server, over HTTP as a client would; and a kill -9 of
the BFL worker mid-poll, after which a new worker resumes the same upstream task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bfl_standin import API_KEY, StandInBfl
from bfl_support import ENGINES, MAX, MULTI, png_data_uri

from e2e.e2e_support import ServerProcess, kontext_server_argv, wait_until_completed

pytestmark = pytest.mark.e2e

LOCAL_RESULT_KEYS = {"images", "timings", "seed", "has_nsfw_concepts", "prompt", "random_weights"}
IMAGE_KEYS = {"url", "width", "height", "content_type", "file_size", "file_name"}


class BflWorkerProcess:
    """``kontext-server worker --engine bfl`` on the server's data dir."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir, self.env = data_dir, env
        self.log_path = data_dir.parent / "bfl-worker.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *kontext_server_argv(),
                    *("worker", "--engine", "bfl", "--data-dir", str(self.data_dir)),
                ],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


@pytest.fixture(scope="module")
def standin() -> Iterator[StandInBfl]:
    server = StandInBfl(ready_after_s=0.5, slow_s=6.0).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, standin: StandInBfl
) -> Iterator[tuple[ServerProcess, BflWorkerProcess]]:
    env = {
        "KONTEXT_ENGINES": json.dumps(ENGINES),
        "KONTEXT_BFL_BASE_URL": standin.url,
        "KONTEXT_BFL_API_KEY": API_KEY,
        "KONTEXT_BFL_POLL_INITIAL_S": "0.1",
        "KONTEXT_BFL_POLL_MAX_S": "0.3",
        "KONTEXT_FETCH_ALLOW_HOSTS": "127.0.0.1",  # the stand-in's sample URLs
        "KONTEXT_LEASE_S": "2",
        "KONTEXT_HEARTBEAT_S": "0.3",
    }
    data_dir = tmp_path_factory.mktemp("bfl-e2e") / "data"
    server = ServerProcess(data_dir, workers=0, env=env)
    worker = BflWorkerProcess(data_dir, server.environment())
    try:
        server.start()
        worker.start()
        yield server, worker
    finally:
        worker.stop()
        server.stop()


def complete(
    client: httpx.Client, stack: tuple[ServerProcess, BflWorkerProcess], endpoint: str, body: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    server, worker = stack
    submitted = client.post(f"/{endpoint}", json=body)
    assert submitted.status_code == 200, submitted.text
    urls = submitted.json()
    try:
        status = wait_until_completed(client, urls["status_url"], timeout_s=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{server.log_tail()}\n{worker.log_tail()}") from exc
    return status, client.get(urls["response_url"]).json()


def test_max_and_multi_complete_through_bfl_with_the_fal_response_shape(
    stack: tuple[ServerProcess, BflWorkerProcess], standin: StandInBfl
) -> None:
    with httpx.Client(base_url=stack[0].base_url, timeout=10.0) as client:
        status, output = complete(
            client, stack, MAX, {"prompt": "e2e max", "image_url": png_data_uri(), "seed": 1}
        )
        assert status.get("error") is None, status
        assert set(output) == LOCAL_RESULT_KEYS and output["seed"] == 1
        [image] = output["images"]
        assert set(image) == IMAGE_KEYS
        downloaded = client.get(image["url"])
        assert downloaded.status_code == 200 and len(downloaded.content) == image["file_size"]

        body = {
            "prompt": "e2e multi",
            "image_urls": [png_data_uri(), png_data_uri(20, 20)],
            "num_images": 2,
            "seed": 50,
        }
        status, output = complete(client, stack, MULTI, body)
        assert status.get("error") is None, status
        assert set(output) == LOCAL_RESULT_KEYS and len(output["images"]) == 2
    assert sorted(b["seed"] for b in standin.submissions_for("e2e multi")) == [50, 51]


def test_moderation_reaches_the_client_as_a_content_policy_error(
    stack: tuple[ServerProcess, BflWorkerProcess],
) -> None:
    with httpx.Client(base_url=stack[0].base_url, timeout=10.0) as client:
        submitted = client.post(
            f"/{MAX}", json={"prompt": "bad [request-moderated]", "image_url": png_data_uri()}
        ).json()
        wait_until_completed(client, submitted["status_url"], timeout_s=30)
        response = client.get(submitted["response_url"])
    assert response.status_code == 422
    assert response.json()["error_type"] == "content_policy_violation"
    assert "moderated" in response.json()["detail"]


def test_kill_9_of_the_bfl_worker_mid_poll_resumes_the_same_upstream_task(
    stack: tuple[ServerProcess, BflWorkerProcess], standin: StandInBfl
) -> None:
    server, worker = stack
    prompt = "crash test [slow]"
    with httpx.Client(base_url=server.base_url, timeout=10.0) as client:
        submitted = client.post(
            f"/{MAX}", json={"prompt": prompt, "image_url": png_data_uri(), "num_images": 2}
        ).json()
        deadline = time.monotonic() + 20
        while len(standin.submissions_for(prompt)) < 2 or standin.polls == 0:
            assert time.monotonic() < deadline, worker.log_tail()
            time.sleep(0.05)
        worker.kill()  # mid-poll: both tasks submitted and recorded, none ready yet
        worker.start()
        status = wait_until_completed(client, submitted["status_url"], timeout_s=40)
        assert status.get("error") is None, f"{status}\n{worker.log_tail()}"
        output = client.get(submitted["response_url"]).json()
    assert len(output["images"]) == 2
    assert len(standin.submissions_for(prompt)) == 2  # one per image: nothing paid twice
    messages = [entry["message"] for entry in status["logs"]]
    assert any("resuming 2" in message for message in messages), messages


def test_serve_starts_a_bfl_worker_when_an_endpoint_is_routed_upstream(
    tmp_path: Path, standin: StandInBfl
) -> None:
    env = {
        "KONTEXT_ENGINES": json.dumps(ENGINES),
        "KONTEXT_BFL_BASE_URL": standin.url,
        "KONTEXT_BFL_API_KEY": API_KEY,
        "KONTEXT_BFL_POLL_INITIAL_S": "0.1",
        "KONTEXT_BFL_POLL_MAX_S": "0.3",
        "KONTEXT_FETCH_ALLOW_HOSTS": "127.0.0.1",
    }
    server = ServerProcess(tmp_path / "data", workers=1, env=env)  # 1 local + the BFL worker
    try:
        server.start()
        with httpx.Client(base_url=server.base_url, timeout=10.0) as client:
            body = {"prompt": "serve routes upstream", "image_url": png_data_uri(), "seed": 9}
            answer = client.post(f"/{MAX}", json=body).json()
            status = wait_until_completed(client, answer["status_url"], timeout_s=60)
        assert status.get("error") is None, f"{status}\n{server.log_tail()}"
        assert len(standin.submissions_for("serve routes upstream")) == 1
    finally:
        server.stop()
