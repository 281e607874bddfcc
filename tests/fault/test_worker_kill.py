"""kill -9 a worker in the middle of an edit: the request completes on another worker, once,
with one result (PostgreSQL + S3 and SQLite + local files)."""

from __future__ import annotations

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
    opened,
    stored_names,
    wait_for,
    wait_until_completed,
)

from kontext_server.domain.jobs import JobStatus

pytestmark = [pytest.mark.fault, pytest.mark.timeout(60)]

STEPS = 20  # 20 x 0.1 s: long enough to be caught mid-edit on a busy machine


def test_a_request_whose_worker_is_killed_mid_edit_completes_on_another_worker(
    backend: Backend, processes: Processes, tmp_path: Path
) -> None:
    api = ApiProcess(backend, tmp_path / "api")
    processes.add(api)
    api.start()
    workers = [
        WorkerProcess(backend, tmp_path, f"w{i}", steps=STEPS, step_s=0.1, lease_s=1.5)
        for i in range(2)
    ]
    for worker in workers:
        processes.add(worker)
        worker.start()

    with httpx.Client(base_url=api.base_url, timeout=10.0) as client, opened(backend) as store:
        answer = client.post(f"/{ENDPOINT}", json={"prompt": "p", "image_url": input_image_uri()})
        assert answer.status_code == 200, answer.text
        job_id = answer.json()["request_id"]

        def running_mid_edit() -> str | None:
            job = store.get(job_id)
            assert job is not None
            assert job.status in (JobStatus.QUEUED, JobStatus.RUNNING), job
            step = job.progress.step if job.progress else 0
            return job.lease_owner if job.status is JobStatus.RUNNING and step >= 2 else None

        owner = wait_for(running_mid_edit, timeout_s=30, what=f"{job_id} mid-edit")
        victim = next(w for w in workers if w.worker_id == owner)
        survivor = next(w for w in workers if w is not victim)
        victim.kill9()

        final = wait_until_completed(client, answer.json()["status_url"], timeout_s=30)
        result = client.get(answer.json()["response_url"])
        job = store.get(job_id)
        events = [e.message for e in store.events(job_id)]

    assert survivor.alive(), survivor.log_tail()
    assert final.get("error") is None, f"{final}\n{processes.logs()}"
    assert result.status_code == 200, result.text
    assert job is not None and job.status is JobStatus.SUCCEEDED
    assert job.attempts == 2, job
    assert events.count("worker lost; retrying") == 1, events
    assert events.count(f"step {STEPS}/{STEPS}") == 1, events  # only the second attempt ended
    images = result.json()["images"]
    assert len(images) == 1
    # One result and one file: the killed attempt published nothing.
    assert job.result is not None
    keys = {image["file_key"] for image in job.result["images"]}
    assert len(keys) == 1 and next(iter(keys)).split("/")[-1].startswith("2-"), keys
    assert stored_names(keys) == stored_names(backend.list_file_keys())
