"""The official Python client (``fal_client`` from PyPI) against a live kontext-server.

Two ways of pointing it at a self-hosted server (PROTOCOL.md §1):
- plain http: the module globals ``fal_client.client.QUEUE_URL_FORMAT`` / ``RUN_URL_FORMAT`` /
  ``REST_URL`` / ``CDN_URL``, patched per test;
- https: ``FAL_RUN_HOST`` / ``FAL_QUEUE_RUN_HOST`` (read when fal_client is imported, so that
  scenario runs in a child interpreter, ``fal_https_scenario.py``) with a self-signed
  certificate trusted through ``SSL_CERT_FILE``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fal_client
import fal_client.client
import httpx
import pytest
from e2e_support import (
    ENDPOINT,
    ServerProcess,
    make_input_data_uri,
    make_tls_files,
)
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

STEP_LOG = re.compile(r"step (\d+)/(\d+)")
LOG_LEVELS = {"INFO", "WARN", "WARNING", "ERROR", "DEBUG", "STDOUT", "STDERR"}
HERE = Path(__file__).parent


@pytest.fixture
def fal(live_server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> fal_client.SyncClient:
    """A fal_client pointed at the live server over plain http; globals restored afterwards."""
    base = live_server.base_url
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{base}/")
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{base}/run/")
    monkeypatch.setattr(fal_client.client, "REST_URL", f"{base}/rest")
    monkeypatch.setattr(fal_client.client, "CDN_URL", f"{base}/cdn")
    # Authentication is off on loopback with no keys; the client still sends a key header.
    return fal_client.SyncClient(key="e2e-any-key", default_timeout=30.0)


def edit_arguments(image_uri: str, **overrides: Any) -> dict[str, Any]:
    return {"prompt": "Put a donut next to the flour.", "image_url": image_uri, **overrides}


def fetch_image(url: str, *, expected_base: str) -> tuple[httpx.Response, Image.Image]:
    assert url.startswith(f"{expected_base}/"), f"image URL {url} is not on {expected_base}"
    response = httpx.get(url, timeout=10.0)
    assert response.status_code == 200, response.text
    return response, Image.open(io.BytesIO(response.content))


def assert_image_entry_matches_file(entry: dict[str, Any], *, base_url: str) -> None:
    """The output image entry describes exactly the file its URL serves."""
    response, image = fetch_image(entry["url"], expected_base=base_url)
    assert response.headers["content-type"].split(";")[0] == entry["content_type"]
    expected_format = {"image/jpeg": "JPEG", "image/png": "PNG"}[entry["content_type"]]
    assert image.format == expected_format
    assert image.size == (entry["width"], entry["height"])
    assert len(response.content) == entry["file_size"]
    assert entry["file_name"].endswith(".jpeg" if expected_format == "JPEG" else ".png")


def log_messages(statuses: list[fal_client.Status]) -> list[str]:
    messages = []
    for status in statuses:
        for entry in getattr(status, "logs", None) or []:
            assert {"message", "level", "source", "timestamp"} <= entry.keys(), entry
            assert entry["level"] in LOG_LEVELS, entry
            messages.append(entry["message"])
    return messages


def test_submit_then_status_with_logs_then_get_returns_the_edited_image(
    fal: fal_client.SyncClient, live_server: ServerProcess, input_image_uri: str
) -> None:
    handle = fal.submit(ENDPOINT, edit_arguments(input_image_uri, seed=42))

    uuid.UUID(handle.request_id)
    assert handle.status_url.startswith(f"{live_server.base_url}/fal-ai/flux-pro/requests/")
    statuses = list(handle.iter_events(with_logs=True, interval=0.05))
    output = handle.get()

    final = statuses[-1]
    assert isinstance(final, fal_client.Completed)
    assert final.error is None
    assert final.error_type is None
    assert all(isinstance(s, fal_client.Queued | fal_client.InProgress) for s in statuses[:-1])
    assert "step 2/2" in log_messages(statuses)
    assert output["seed"] == 42
    assert output["prompt"] == "Put a donut next to the flour."
    assert output["has_nsfw_concepts"] == [False]
    [image] = output["images"]
    assert_image_entry_matches_file(image, base_url=live_server.base_url)
    assert image["content_type"] == "image/jpeg"


def test_subscribe_reports_queue_position_then_progress_logs_then_the_result(
    fal: fal_client.SyncClient, input_image_uri: str
) -> None:
    # One worker: a request submitted just before keeps ours in line for a while.
    blocker = fal.submit(ENDPOINT, edit_arguments(input_image_uri))
    enqueued: list[str] = []
    updates: list[fal_client.Status] = []

    output = fal.subscribe(
        ENDPOINT,
        edit_arguments(input_image_uri, seed=7),
        with_logs=True,
        on_enqueue=enqueued.append,
        on_queue_update=updates.append,
        interval=0.05,
    )

    assert len(enqueued) == 1
    queued = [u for u in updates if isinstance(u, fal_client.Queued)]
    in_progress = [u for u in updates if isinstance(u, fal_client.InProgress)]
    assert queued, f"never saw IN_QUEUE: {updates}"
    assert all(isinstance(u.position, int) and u.position >= 0 for u in queued)
    positions = [u.position for u in queued]
    assert positions == sorted(positions, reverse=True), "queue position went up"
    assert in_progress, f"never saw IN_PROGRESS: {updates}"
    assert any(STEP_LOG.fullmatch(m) for m in log_messages(in_progress)), in_progress
    assert isinstance(updates[-1], fal_client.Completed)
    assert updates[-1].error is None
    assert output["seed"] == 7
    assert len(output["images"]) == 1
    assert blocker.get()["images"]


def test_status_result_and_cancel_rebuild_urls_from_the_request_id(
    fal: fal_client.SyncClient, input_image_uri: str
) -> None:
    """``status()/result()/cancel()`` by request id use owner/alias only: /fal-ai/flux-pro/..."""
    request_id = fal.submit(ENDPOINT, edit_arguments(input_image_uri, seed=3)).request_id

    output = fal.result(ENDPOINT, request_id)  # polls status, then fetches the result
    status = fal.status(ENDPOINT, request_id, with_logs=True)

    assert output["seed"] == 3
    assert isinstance(status, fal_client.Completed)
    assert status.error is None
    assert "step 2/2" in log_messages([status])
    with pytest.raises(fal_client.FalClientHTTPError) as refused:
        fal.cancel(ENDPOINT, request_id)
    assert refused.value.status_code == 400  # ALREADY_COMPLETED
    with pytest.raises(fal_client.FalClientHTTPError) as unknown:
        fal.status(ENDPOINT, str(uuid.uuid4()))
    assert unknown.value.status_code == 404


def test_cancel_of_a_queued_request_completes_it_as_cancelled_at_once(
    fal: fal_client.SyncClient, input_image_uri: str
) -> None:
    # One worker: the request submitted just before is running or about to run.
    blocker = fal.submit(ENDPOINT, edit_arguments(input_image_uri))
    target = fal.submit(ENDPOINT, edit_arguments(input_image_uri))
    before = target.status()
    assert isinstance(before, fal_client.Queued), before

    target.cancel()
    after = target.status(with_logs=True)

    assert isinstance(after, fal_client.Completed), after
    assert after.error_type == "client_cancelled"
    assert after.error
    with pytest.raises(fal_client.FalClientHTTPError) as failed:
        target.get()
    assert failed.value.status_code >= 400
    assert failed.value.error_type == "client_cancelled"
    assert len(blocker.get()["images"]) == 1  # the other request is untouched


def test_run_answers_synchronously_with_the_requested_format_and_aspect_ratio(
    fal: fal_client.SyncClient, live_server: ServerProcess, input_image_uri: str
) -> None:
    output = fal.run(
        ENDPOINT,
        edit_arguments(input_image_uri, output_format="png", aspect_ratio="16:9", seed=5),
        timeout=60,
    )

    [image] = output["images"]
    assert output["seed"] == 5
    assert image["content_type"] == "image/png"
    assert image["width"] > image["height"]
    assert abs(image["width"] / image["height"] - 16 / 9) < 0.05
    assert_image_entry_matches_file(image, base_url=live_server.base_url)


def test_sync_mode_returns_the_image_inline_as_a_data_uri(
    fal: fal_client.SyncClient, input_image_uri: str
) -> None:
    output = fal.subscribe(ENDPOINT, edit_arguments(input_image_uri, sync_mode=True), interval=0.05)

    [image] = output["images"]
    prefix = "data:image/jpeg;base64,"
    assert image["url"].startswith(prefix)
    data = base64.b64decode(image["url"][len(prefix) :])
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "JPEG"
    assert decoded.size == (image["width"], image["height"])
    assert len(data) == image["file_size"]


@pytest.mark.parametrize("call", ["submit", "run"])
def test_invalid_aspect_ratio_is_a_422_that_says_what_is_allowed(
    fal: fal_client.SyncClient, input_image_uri: str, call: str
) -> None:
    arguments = edit_arguments(input_image_uri, aspect_ratio="string")  # as in the spec example

    with pytest.raises(fal_client.FalClientHTTPError) as refused:
        getattr(fal, call)(ENDPOINT, arguments)

    assert refused.value.status_code == 422
    detail = refused.value.response.json()["detail"]
    [error] = [e for e in detail if e["loc"][-1] == "aspect_ratio"]
    assert "21:9" in error["msg"], error
    assert "string" in error["msg"], error


# --- https: FAL_RUN_HOST / FAL_QUEUE_RUN_HOST + a self-signed certificate -------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("e2e-tls")
    server = ServerProcess(folder / "data", tls=make_tls_files(folder / "tls"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_client_configured_by_environment_works_over_https(tls_server: ServerProcess) -> None:
    assert tls_server.tls is not None
    host = f"127.0.0.1:{tls_server.port}"
    env = {
        **os.environ,
        "FAL_RUN_HOST": f"{host}/run",
        "FAL_QUEUE_RUN_HOST": f"{host}/queue",
        "SSL_CERT_FILE": str(tls_server.tls.ca_cert),
        "FAL_KEY": "e2e-any-key",
    }
    completed = subprocess.run(
        [sys.executable, str(HERE / "fal_https_scenario.py"), make_input_data_uri()],
        env=env,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert completed.returncode == 0, f"{completed.stderr}\n{tls_server.log_tail()}"
    report = json.loads(completed.stdout.strip().splitlines()[-1])

    base = f"https://{host}"
    assert report["status_url"].startswith(f"{base}/queue/fal-ai/flux-pro/requests/")
    assert report["update_kinds"][-1] == "Completed"
    assert "InProgress" in report["update_kinds"] or "Queued" in report["update_kinds"]
    assert "step 2/2" in report["log_messages"]
    assert report["subscribe_seed"] == 11
    assert report["result_by_id_seed"] == 11
    assert report["status_by_id"] == "Completed"
    assert report["run_seed"] == 12
    assert report["invalid_status_code"] == 422
    image = report["image"]
    assert image["url"].startswith(f"{base}/")
    assert image["fetched_status"] == 200
    assert image["fetched_size"] == [image["width"], image["height"]]
    assert image["fetched_bytes"] == image["file_size"]
