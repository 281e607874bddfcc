"""Stop PostgreSQL for a few seconds under load, start it again: the API process and the
workers recover by themselves (no restart), and every request completes once."""

from __future__ import annotations

import time
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
)

from contract.pg_cluster import PgCluster
from kontext_server.domain.jobs import JobStatus

pytestmark = [pytest.mark.fault, pytest.mark.timeout(90)]

BEFORE = 20  # requests submitted before the outage
OUTAGE_S = 3.0


def test_api_and_workers_recover_from_a_postgresql_outage_under_load(
    pg_cluster: PgCluster, pg_backend: Backend, processes: Processes, tmp_path: Path
) -> None:
    api = ApiProcess(pg_backend, tmp_path / "api")
    processes.add(api)
    api.start()
    workers = [
        WorkerProcess(pg_backend, tmp_path, f"w{i}", steps=5, step_s=0.1, lease_s=3.0)
        for i in range(2)
    ]
    for worker in workers:
        processes.add(worker)
        worker.start()
    body = {"prompt": "outage", "image_url": input_image_uri()}

    with httpx.Client(base_url=api.base_url, timeout=10.0) as client:
        answers = [client.post(f"/{ENDPOINT}", json=body) for _ in range(BEFORE)]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        ids = [a.json()["request_id"] for a in answers]
        wait_for(
            lambda: client.get(answers[0].json()["status_url"]).json()["status"] == "COMPLETED",
            timeout_s=30,
            what="work under way before the outage",
        )

        pg_cluster.stop("fast")
        try:
            down_at = time.monotonic()
            during = client.post(f"/{ENDPOINT}", json=body)
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
        finally:
            pg_cluster.start()
        # A submit during the outage is refused, never acknowledged and then lost.
        assert during.status_code == 503, during.text
        assert during.headers["retry-after"].isdigit()
        assert "unavailable" in during.json()["detail"]

        def submit_works() -> httpx.Response | None:
            answer = client.post(f"/{ENDPOINT}", json=body)
            return answer if answer.status_code == 200 else None

        recovered_at = time.monotonic()
        after = wait_for(submit_works, timeout_s=20, poll_s=0.2, what="the API to recover")
        api_recovery_s = time.monotonic() - recovered_at
        ids.append(after.json()["request_id"])

        with opened(pg_backend) as store:

            def all_final() -> bool:
                return all(store.get(i).status.is_final for i in ids)  # type: ignore[union-attr]

            wait_for(all_final, timeout_s=40, poll_s=0.5, what="every request to finish")
            jobs = [store.get(i) for i in ids]

    assert api.alive(), api.log_tail()
    assert all(w.alive() for w in workers), processes.logs()
    failed = [(j.id, j.status, j.error) for j in jobs if j and j.status is not JobStatus.SUCCEEDED]
    assert not failed, f"{failed}\n{processes.logs()}"
    keys = {
        image["file_key"] for job in jobs if job and job.result for image in job.result["images"]
    }
    assert len(keys) == len(ids)
    # A request whose attempt was cut by the outage re-ran; its first attempt left no result
    # (a late file of a fenced attempt may remain in the bucket, never in a result).
    assert stored_names(keys) <= stored_names(pg_backend.list_file_keys())
    print(f"API accepted submits again {api_recovery_s:.2f} s after PostgreSQL was back")
