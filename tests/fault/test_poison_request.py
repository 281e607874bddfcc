"""A request that kills its worker on every attempt ends FAILED after ``max_attempts`` with an
error that says so, and the other requests still complete. The workers are restarted by the
production ``WorkerSupervisor`` (as under ``serve``), on PostgreSQL + S3."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
from fault_engines import POISON_PROMPT
from fault_support import (
    ENDPOINT,
    HERE,
    ApiProcess,
    Backend,
    Processes,
    input_image_uri,
    opened,
    wait_for,
)

from kontext_server.cli.supervisor import WorkerSpec, WorkerSupervisor
from kontext_server.domain.jobs import JobStatus

pytestmark = [pytest.mark.fault, pytest.mark.timeout(90)]

OTHERS = 6


def test_a_request_that_always_kills_its_worker_fails_after_max_attempts_and_others_complete(
    pg_backend: Backend, processes: Processes, tmp_path: Path
) -> None:
    api = ApiProcess(pg_backend, tmp_path / "api", env={"KONTEXT_MAX_ATTEMPTS": "3"})
    processes.add(api)
    api.start()
    argv = [
        sys.executable,
        str(HERE / "fault_worker.py"),
        "poison",
        "--store",
        pg_backend.store_url,
        "--files",
        pg_backend.files_url,
        "--lease-s",
        "1.5",
        "--steps",
        "3",
        "--step-s",
        "0.05",
    ]
    supervisor = WorkerSupervisor(
        [WorkerSpec([*argv, "--name", f"w{i}"], pg_backend.env) for i in range(2)], poll_s=0.2
    )
    body = {"image_url": input_image_uri()}
    supervisor.start()
    try:
        with httpx.Client(base_url=api.base_url, timeout=10.0) as client:
            poison = client.post(f"/{ENDPOINT}", json={**body, "prompt": POISON_PROMPT})
            others = [
                client.post(f"/{ENDPOINT}", json={**body, "prompt": f"fine {i}"})
                for i in range(OTHERS)
            ]
            ids = [a.json()["request_id"] for a in [poison, *others]]
            with opened(pg_backend) as store:

                def all_final() -> bool:
                    return all(store.get(i).status.is_final for i in ids)  # type: ignore[union-attr]

                wait_for(all_final, timeout_s=60, poll_s=0.2, what="every request to finish")
                jobs = [store.get(i) for i in ids]
            status = client.get(poison.json()["status_url"]).json()
            result = client.get(poison.json()["response_url"])
    finally:
        supervisor.stop(timeout_s=5)

    poisoned, fine = jobs[0], jobs[1:]
    assert poisoned is not None and poisoned.status is JobStatus.FAILED, poisoned
    assert poisoned.attempts == 3
    assert poisoned.error_type == "runner_disconnected"
    assert status["status"] == "COMPLETED"
    assert "no attempts are left" in status["error"], status
    assert status["error_type"] == "runner_disconnected"
    assert result.status_code >= 500, result.text
    assert all(j is not None and j.status is JobStatus.SUCCEEDED for j in fine), fine
    assert all(j is not None and j.attempts == 1 for j in fine)
