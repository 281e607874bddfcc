"""Cancel reaches a running request whose worker is another process, asked through another
API process than the one that took the submit (PostgreSQL + S3)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from fault_support import (
    ENDPOINT,
    ApiProcess,
    Backend,
    Processes,
    WorkerProcess,
    input_image_uri,
    on_base,
    wait_for,
    wait_until_completed,
)

pytestmark = [pytest.mark.fault, pytest.mark.timeout(60)]

STEPS = 100  # 10 s if nobody stops it
STEP_LOG = re.compile(r"step (\d+)/(\d+)")


def steps_logged(status: dict[str, object]) -> list[int]:
    logs = status.get("logs") or []
    assert isinstance(logs, list)
    return [int(m.group(1)) for e in logs if (m := STEP_LOG.fullmatch(e["message"]))]


def test_cancel_through_another_api_process_stops_a_job_running_in_a_worker_process(
    pg_backend: Backend, processes: Processes, tmp_path: Path
) -> None:
    api_a = ApiProcess(pg_backend, tmp_path / "api-a")
    api_b = ApiProcess(pg_backend, tmp_path / "api-b")
    worker = WorkerProcess(pg_backend, tmp_path, "w0", steps=STEPS, step_s=0.1)
    for process in (api_a, api_b):
        processes.add(process)
        process.start()
    processes.add(worker)
    worker.start()

    with httpx.Client(timeout=10.0) as client:
        answer = client.post(
            f"{api_a.base_url}/{ENDPOINT}", json={"prompt": "p", "image_url": input_image_uri()}
        ).json()
        status_on_b = on_base(answer["status_url"], api_b.base_url)

        def running() -> bool:
            status = client.get(status_on_b, params={"logs": "1"}).json()
            return status["status"] == "IN_PROGRESS" and bool(steps_logged(status))

        wait_for(running, timeout_s=30, what="the request to run")
        cancel = client.put(on_base(answer["cancel_url"], api_b.base_url))
        final = wait_until_completed(client, answer["status_url"], timeout_s=10)
        # The worker is free again: the next request runs at once.
        follow_up = client.post(
            f"{api_b.base_url}/{ENDPOINT}", json={"prompt": "q", "image_url": input_image_uri()}
        ).json()
        wait_for(
            lambda: client.get(follow_up["status_url"]).json()["status"] == "IN_PROGRESS",
            timeout_s=10,
            what="the next request to start",
        )

    assert cancel.status_code == 202, cancel.text
    assert cancel.json() == {"status": "CANCELLATION_REQUESTED"}
    assert final["error_type"] == "client_cancelled", final
    assert max(steps_logged(final)) < STEPS // 2, "the worker did not stop at its next step"
    assert worker.alive(), worker.log_tail()
