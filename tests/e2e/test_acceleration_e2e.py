"""A served worker with a compiling preset: it compiles before its first claim, /readyz says
so until it is done, and a restart finds the compiled kernels in the data dir."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from e2e_support import ENDPOINT, ServerProcess, make_input_data_uri, wait_until_completed

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def readiness_until_ready(server: ServerProcess, timeout_s: float) -> list[tuple[int, str]]:
    """Every /readyz answer (status, body) until the first 200."""
    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=server.base_url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            answer = client.get("/readyz")
            seen.append((answer.status_code, answer.text))
            if answer.status_code == 200:
                return seen
            time.sleep(0.2)
    raise AssertionError(f"not ready after {timeout_s} s: {seen[-3:]}\n{server.log_tail()}")


def warmup_seconds(server: ServerProcess) -> list[float]:
    return [float(s) for s in re.findall(r"warm-up took ([0-9.]+) s", server.log_tail(10**7))]


def test_a_compiling_worker_is_not_ready_until_compiled_and_restarts_warm(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    server = ServerProcess(data_dir, env={"KONTEXT_ACCELERATION": "compile"})
    server.start()
    try:
        seen = readiness_until_ready(server, timeout_s=150)
        waiting = [body for status, body in seen if status == 503]
        assert any("compiling" in body for body in waiting), seen
        assert all(status in (200, 503) for status, _ in seen), seen

        with httpx.Client(base_url=server.base_url, timeout=10.0) as client:
            answer = client.post(
                f"/{ENDPOINT}",
                json={"prompt": "compiled", "image_url": make_input_data_uri()},
            )
            assert answer.status_code == 200, answer.text
            final = wait_until_completed(client, answer.json()["status_url"], timeout_s=60)
        assert final.get("error") is None, final
        assert list((data_dir / "compile-cache" / "inductor").rglob("*.py")), server.log_tail()
    finally:
        server.stop()

    server.start()  # same data dir: the compiled kernels are found there
    try:
        readiness_until_ready(server, timeout_s=150)
    finally:
        server.stop()
    first, second = warmup_seconds(server)
    # Reported, not judged (CPU timings vary): the log says both.
    print(f"warm-up: {first:.1f} s cold, {second:.1f} s with the compile cache")
    assert not list((data_dir / "workers").glob("*.json"))  # state files go with the workers


def test_a_worker_that_cannot_load_its_preset_says_why_in_readyz(tmp_path: Path) -> None:
    # fp8 needs CUDA: on this CPU the worker refuses to start, and is not restarted in a loop
    server = ServerProcess(tmp_path / "data", env={"KONTEXT_ACCELERATION": "fp8"})
    server.start()
    try:
        deadline = time.monotonic() + 90
        body = ""
        with httpx.Client(base_url=server.base_url, timeout=5.0) as client:
            while time.monotonic() < deadline and "could not start" not in body:
                answer = client.get("/readyz")
                assert answer.status_code == 503, answer.text
                body = answer.text
                time.sleep(0.3)
        assert "could not start" in body, f"{body}\n{server.log_tail()}"
        assert "acceleration fp8 needs a CUDA GPU" in body
        log = server.log_tail(10**7)
        assert "could not load its model; trying again in 30 s" in log
        assert log.count("cannot start:") == 1  # one attempt so far, not a crash loop
    finally:
        server.stop()
