"""The official JS client (``@fal-ai/client`` from npm) under Node against a live kontext-server.

The scenarios live in ``js/fal_client.test.mjs`` (Node's built-in test runner); this wrapper
starts nothing itself but hands the shared live server's URL and an input image to Node.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from e2e_support import ServerProcess, make_input_data_uri

pytestmark = [pytest.mark.e2e, pytest.mark.node, pytest.mark.timeout(150)]

JS_DIR = Path(__file__).parent / "js"
NODE = shutil.which("node")


def ensure_node_modules() -> None:
    """``make install`` runs ``npm ci`` here; do it now if that was skipped."""
    if (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir():
        return
    npm = shutil.which("npm")
    assert npm, f"{JS_DIR}/node_modules is missing and npm is not installed to run `npm ci`"
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=120)


@pytest.mark.skipif(NODE is None, reason="node is not installed (needed for @fal-ai/client)")
def test_official_js_client_passes_its_scenarios(live_server: ServerProcess) -> None:
    assert NODE is not None
    ensure_node_modules()
    env = {
        **os.environ,
        "KONTEXT_E2E_URL": live_server.base_url,
        "KONTEXT_E2E_IMAGE": make_input_data_uri(),
    }

    completed = subprocess.run(
        [NODE, "--test", "--test-reporter=spec", "fal_client.test.mjs"],
        cwd=JS_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )

    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"{live_server.log_tail()}\n----- node -----\n{output}"
    assert "fail 0" in output, output
