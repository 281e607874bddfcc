"""Uploads, proxy mode and the client CLI against a live kontext-server (real processes).

- ``fal_client.upload_file()`` (token + CDN upload, and its initiate + PUT fallback) stores
  the file on the server, and the URL it returns works as ``image_url`` of an edit;
- the JS client in proxy mode (``js/uploads_proxy.test.mjs``): ``fal.storage.upload``, a
  Blob inside the input, subscribe/status/result through ``/proxy``;
- ``kontext-server edit --server`` uploads, waits with a progress bar and downloads.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import fal_client
import fal_client.client
import httpx
import pytest
from e2e_support import (
    ENDPOINT,
    ServerProcess,
    kontext_server_argv,
    make_input_data_uri,
    wait_until_completed,
)
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

JS_DIR = Path(__file__).parent / "js"
NODE = shutil.which("node")


@pytest.fixture
def fal(live_server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> fal_client.SyncClient:
    """fal_client pointed at the live server over plain http (module globals, restored)."""
    base = live_server.base_url
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{base}/")
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{base}/run/")
    monkeypatch.setattr(fal_client.client, "REST_URL", f"{base}/rest")
    monkeypatch.setattr(fal_client.client, "CDN_URL", f"{base}/cdn")
    return fal_client.SyncClient(key="e2e-any-key", default_timeout=30.0)


@pytest.fixture
def png_file(tmp_path: Path) -> Path:
    path = tmp_path / "input image.png"
    path.write_bytes(base64.b64decode(make_input_data_uri().split(",", 1)[1]))
    return path


def test_upload_file_then_subscribe_with_its_url_completes(
    fal: fal_client.SyncClient, live_server: ServerProcess, png_file: Path
) -> None:
    url = fal.upload_file(png_file)

    assert url.startswith(f"{live_server.base_url}/files/uploads/"), url
    assert httpx.get(url).content == png_file.read_bytes()
    output = fal.subscribe(
        ENDPOINT, {"prompt": "Put a donut next to the flour.", "image_url": url, "seed": 11}
    )

    assert output["seed"] == 11
    [image] = output["images"]
    assert httpx.get(image["url"]).status_code == 200


def test_the_initiate_and_put_fallback_stores_the_file_too(
    fal: fal_client.SyncClient, live_server: ServerProcess, png_file: Path
) -> None:
    url = fal.upload(
        png_file.read_bytes(), "image/png", "cat.png", repository="fal", fallback_repository=[]
    )

    assert url.startswith(f"{live_server.base_url}/files/uploads/")
    assert url.endswith("/cat.png")
    assert httpx.get(url).content == png_file.read_bytes()


def test_cli_edit_with_server_uploads_waits_and_downloads(
    live_server: ServerProcess, png_file: Path, tmp_path: Path
) -> None:
    completed = subprocess.run(
        [
            *kontext_server_argv(), "edit", "--server", live_server.base_url,
            "--image", str(png_file), "--prompt", "make it blue", "--seed", "5",
            "--output-format", "png", "--out", str(tmp_path / "out"), "--json",
        ],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip

    assert completed.returncode == 0, f"{completed.stderr}\n{live_server.log_tail()}"
    summary = json.loads(completed.stdout)
    assert summary["seed"] == 5
    [entry] = summary["files"]
    with Image.open(entry["path"]) as image:
        assert image.format == "PNG"
        assert image.size == (entry["width"], entry["height"])
    assert "2/2" in completed.stderr  # the progress bar reached the last step


def test_cli_submit_status_and_result_by_request_id(live_server: ServerProcess) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*kontext_server_argv(), *args, "--server", live_server.base_url],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    image = make_input_data_uri()
    submitted = cli("submit", "--prompt", "x", "--image", image, "--seed", "8")
    assert submitted.returncode == 0, submitted.stderr
    request_id = submitted.stdout.strip()
    with httpx.Client(timeout=10.0) as client:
        status_url = f"{live_server.base_url}/fal-ai/flux-pro/requests/{request_id}/status"
        wait_until_completed(client, status_url, timeout_s=60)

    status = cli("status", request_id)
    result = cli("result", request_id)

    assert status.stdout.startswith("COMPLETED"), status.stdout + status.stderr
    assert json.loads(result.stdout)["seed"] == 8


@pytest.mark.node
@pytest.mark.skipif(NODE is None, reason="node is not installed (needed for @fal-ai/client)")
def test_js_client_uploads_and_proxy_mode(live_server: ServerProcess) -> None:
    from test_fal_client_js import ensure_node_modules

    assert NODE is not None
    ensure_node_modules()
    env = {
        **os.environ,
        "KONTEXT_E2E_URL": live_server.base_url,
        "KONTEXT_E2E_IMAGE": make_input_data_uri(),
    }

    completed = subprocess.run(
        [NODE, "--test", "--test-reporter=spec", "uploads_proxy.test.mjs"],
        cwd=JS_DIR, env=env, capture_output=True, text=True, timeout=140, check=False,
    )  # fmt: skip

    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"{live_server.log_tail()}\n----- node -----\n{output}"
    assert "fail 0" in output, output
