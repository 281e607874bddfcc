"""A worker whose lease was taken over cannot publish its late result: the worker is frozen
(SIGSTOP) mid-edit until its lease expires and another worker re-runs the request, then
thawed; its engine never polls for cancellation, so it finishes its edit and tries to
record it. The request keeps the second attempt's result (PostgreSQL + S3)."""

from __future__ import annotations

import signal
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
    wait_for,
)

from kontext_server.domain.jobs import JobStatus

pytestmark = [pytest.mark.fault, pytest.mark.timeout(60)]

STEPS = 10
LATE_ATTEMPT_ENDED = ("not recorded: lease lost", "abandoning this attempt")


def test_a_worker_that_lost_its_lease_cannot_publish_its_late_result(
    pg_backend: Backend, processes: Processes, tmp_path: Path
) -> None:
    api = ApiProcess(pg_backend, tmp_path / "api")
    processes.add(api)
    api.start()
    workers = [
        WorkerProcess(
            pg_backend, tmp_path, f"w{i}", engine="stubborn", steps=STEPS, step_s=0.2, lease_s=1.5
        )
        for i in range(2)
    ]
    for worker in workers:
        processes.add(worker)
        worker.start()

    with httpx.Client(base_url=api.base_url, timeout=10.0) as client, opened(pg_backend) as store:
        answer = client.post(f"/{ENDPOINT}", json={"prompt": "p", "image_url": input_image_uri()})
        job_id = answer.json()["request_id"]

        def owner_mid_edit() -> str | None:
            job = store.get(job_id)
            assert job is not None and not job.status.is_final, job
            running = job.status is JobStatus.RUNNING and job.progress is not None
            return job.lease_owner if running else None

        first_owner = wait_for(owner_mid_edit, timeout_s=30, what="the first attempt")
        late = next(w for w in workers if w.worker_id == first_owner)
        late.signal(signal.SIGSTOP)

        def taken_over() -> bool:
            job = store.get(job_id)
            assert job is not None
            return job.attempts == 2 and job.lease_owner not in (None, first_owner)

        wait_for(taken_over, timeout_s=20, what="another worker to take the request over")
        late.signal(signal.SIGCONT)
        final = wait_for(
            lambda: (j := store.get(job_id)) is not None and j.status.is_final and j,
            timeout_s=20,
            what="the request to finish",
        )
        wait_for(
            lambda: any(m in late.log_path.read_text() for m in LATE_ATTEMPT_ENDED),
            timeout_s=20,
            what="the late attempt to end",
        )
        after = store.get(job_id)
        events = [e.message for e in store.events(job_id)]
        served = client.get(answer.json()["response_url"])

    assert late.alive(), late.log_tail()
    assert final.status is JobStatus.SUCCEEDED and final.attempts == 2, final
    assert after == final, "the late attempt changed the request"
    assert final.result is not None
    names = [image["file_key"].rsplit("/", 1)[-1] for image in final.result["images"]]
    assert names == ["2-0.jpeg"], names
    assert served.status_code == 200
    assert [i["file_name"] for i in served.json()["images"]] == ["2-0.jpeg"]
    assert events.count(f"step {STEPS}/{STEPS}") == 1, events
