"""Kill the whole service (API + workers, SIGKILL) while requests are queued and running, start
it again on the same data dir, and every request completes exactly once with a result."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_support import ENDPOINT, ServerProcess, make_input_data_uri, wait_until_completed

# The bound of the whole scenario (two starts, a kill, 3 edits of 6 steps); ~25 s when idle.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

REQUESTS = 3
STEPS = 6  # slow enough (~0.2 s per step on 2 cores) to catch one request mid-edit
STEP_LOG = re.compile(r"step (\d+)/(\d+)")


def live_members(pgid: int) -> list[int]:
    """Pids in process group ``pgid`` that are not zombies (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        state, process_group = fields[0], int(fields[2])
        if process_group == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def process_group_is_gone(pgid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while live_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def wait_until_running_mid_edit(
    client: httpx.Client, status_url: str, server: ServerProcess, *, timeout_s: float
) -> int:
    """Poll until the request is IN_PROGRESS with some but not all steps done; the step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(status_url, params={"logs": "1"}).json()
        assert body["status"] != "COMPLETED", f"finished before it could be caught: {body}"
        steps = [
            int(match.group(1))
            for entry in body.get("logs") or []
            if (match := STEP_LOG.fullmatch(entry["message"]))
        ]
        if body["status"] == "IN_PROGRESS" and steps and max(steps) <= STEPS - 3:
            return max(steps)
        time.sleep(0.02)
    raise AssertionError(f"never saw the request mid-edit\n{server.log_tail()}")


def stored_files(data_dir: Path) -> set[str]:
    """Keys of every file in the (default, local) file store of ``data_dir``."""
    root = data_dir / "files"
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def file_key(url: str) -> str:
    return url.split("/files/", 1)[1]


def test_every_request_completes_exactly_once_after_the_whole_service_is_killed(
    tmp_path: Path,
) -> None:
    server = ServerProcess(
        tmp_path / "data",
        env={
            "KONTEXT_DEFAULT_STEPS": str(STEPS),
            "KONTEXT_LEASE_S": "2",
            "KONTEXT_HEARTBEAT_S": "0.5",
        },
    )
    image_uri = make_input_data_uri()
    try:
        server.start()
        with httpx.Client(base_url=server.base_url, timeout=10.0) as client:
            submitted = [
                client.post(f"/{ENDPOINT}", json={"prompt": f"edit {i}", "image_url": image_uri})
                for i in range(REQUESTS)
            ]
            assert all(r.status_code == 200 for r in submitted), [r.text for r in submitted]
            jobs: list[dict[str, Any]] = [r.json() for r in submitted]
            wait_until_running_mid_edit(client, jobs[0]["status_url"], server, timeout_s=40)
            queued = [client.get(job["status_url"]).json()["status"] for job in jobs[1:]]
            assert queued == ["IN_QUEUE"] * (REQUESTS - 1)

            pgid = server.pid
            assert pgid is not None
            server.kill()
            assert process_group_is_gone(pgid), "a worker outlived the kill of its service"
            server.start()

            finals = [wait_until_completed(client, job["status_url"], timeout_s=40) for job in jobs]
            results = [client.get(job["response_url"]) for job in jobs]
            # Read again a moment later: a completed result never changes (no second run).
            time.sleep(1.0)
            again = [client.get(job["response_url"]).json() for job in jobs]
    finally:
        server.stop()

    for final in finals:
        assert final.get("error") is None, final
        assert final.get("error_type") is None, final
    for response in results:
        assert response.status_code == 200, response.text
    outputs = [r.json() for r in results]
    assert outputs == again
    assert [o["prompt"] for o in outputs] == [f"edit {i}" for i in range(REQUESTS)]
    assert all(len(o["images"]) == 1 for o in outputs)
    keys = {file_key(o["images"][0]["url"]) for o in outputs}
    assert len(keys) == REQUESTS
    # Each request produced its image once: the killed attempt (stopped mid-denoising) wrote
    # nothing, and no request ran to the end twice.
    assert stored_files(server.data_dir) == keys
