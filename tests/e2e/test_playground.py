"""The playground page: its routes over plain HTTP, and the page itself in a real browser.

The browser scenarios live in ``js/playground.spec.mjs`` (Node's test runner driving Debian's
Chromium through playwright-core); this module starts a live server whose edits are slow
enough (10 steps) to be cancelled mid-edit, hands Node its URL, an image file to pick and a
folder for screenshots, and checks the screenshots came back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_support import ServerProcess, warm_up
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

JS_DIR = Path(__file__).parent / "js"
NODE = shutil.which("node")
CHROMIUM = Path("/usr/bin/chromium")
STEPS = 10  # ~0.2 s per step on 2 cores: time to press Cancel mid-edit
SCREENSHOTS = ("playground-result.png", "playground-narrow.png")


@pytest.fixture(scope="module")
def playground_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tmp_path_factory.mktemp("playground") / "data", env={"KONTEXT_DEFAULT_STEPS": str(STEPS)}
    )
    try:
        server.start()
        warm_up(server)
        yield server
    finally:
        server.stop()


def test_root_answers_json_links_to_api_clients(playground_server: ServerProcess) -> None:
    response = httpx.get(f"{playground_server.base_url}/", headers={"accept": "application/json"})

    assert response.status_code == 200
    body = response.json()
    assert body["playground"] == f"{playground_server.base_url}/playground"
    assert f"{playground_server.base_url}/fal-ai/flux-pro/kontext/max" in body["endpoints"].values()


def test_root_serves_the_page_to_browsers(playground_server: ServerProcess) -> None:
    accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    root = httpx.get(f"{playground_server.base_url}/", headers={"accept": accept})
    page = httpx.get(f"{playground_server.base_url}/playground")

    assert root.status_code == page.status_code == 200
    assert root.headers["content-type"].startswith("text/html")
    assert root.text == page.text
    assert "accept" in root.headers["vary"].lower()
    assert 'src="playground/playground.js"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]


def test_page_assets_are_served_with_their_types(playground_server: ServerProcess) -> None:
    base = playground_server.base_url
    script = httpx.get(f"{base}/playground/playground.js")
    style = httpx.get(f"{base}/playground/playground.css")
    config = httpx.get(f"{base}/playground/config.json")

    assert script.headers["content-type"].startswith("text/javascript")
    assert style.headers["content-type"].startswith("text/css")
    endpoints = [entry["id"] for entry in config.json()["endpoints"]]
    assert endpoints == ["fal-ai/flux-pro/kontext/max", "fal-ai/flux-pro/kontext/max/multi"]
    assert config.json()["auth_required"] is False


def test_unknown_page_assets_are_not_found(playground_server: ServerProcess) -> None:
    base = playground_server.base_url
    for name in ("missing.js", "index.html", "..%2Fplayground.py", ".hidden.css"):
        assert httpx.get(f"{base}/playground/{name}").status_code in (404, 405), name


def test_trailing_slash_redirects_to_the_page(playground_server: ServerProcess) -> None:
    response = httpx.get(f"{playground_server.base_url}/playground/")

    assert response.status_code == 307
    assert response.headers["location"] == f"{playground_server.base_url}/playground"


@pytest.mark.node
@pytest.mark.skipif(NODE is None, reason="node is not installed (needed to drive Chromium)")
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (Debian's chromium; .ci/run installs it)"
)
def test_playground_edits_cancels_and_explains_errors_in_chromium(
    playground_server: ServerProcess, tmp_path: Path
) -> None:
    assert NODE is not None
    ensure_node_modules()
    image_file = tmp_path / "flour.png"
    _gradient(160, 120).save(image_file)
    screenshots = tmp_path / "screenshots"
    screenshots.mkdir()
    env = {
        **os.environ,
        "KONTEXT_E2E_URL": playground_server.base_url,
        "KONTEXT_E2E_IMAGE_FILE": str(image_file),
        "KONTEXT_E2E_SCREENSHOTS": str(screenshots),
        "KONTEXT_E2E_CHROMIUM": str(CHROMIUM),
    }

    completed = subprocess.run(
        [NODE, "--test", "--test-reporter=spec", "--test-concurrency=1", "playground.spec.mjs"],
        cwd=JS_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )

    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"{playground_server.log_tail()}\n----- node -----\n{output}"
    assert "fail 0" in output, output
    for name in SCREENSHOTS:
        with Image.open(screenshots / name) as shot:
            assert shot.format == "PNG"
            assert shot.width >= 400 and shot.height >= 600, (name, shot.size)


def ensure_node_modules() -> None:
    """``make install`` runs ``npm ci`` in js/; do it now if that was skipped."""
    if (JS_DIR / "node_modules" / "playwright-core").is_dir():
        return
    npm = shutil.which("npm")
    assert npm, f"{JS_DIR}/node_modules is missing and npm is not installed to run `npm ci`"
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=120)


def _gradient(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata(
        [(x * 255 // width, 96, y * 255 // height) for y in range(height) for x in range(width)]
    )
    return image
