"""kill -9 an API process during a burst of 500 submits: every acknowledged request exists
and completes, once. Clients whose submit got no answer retry on the other API process with
the same ``Idempotency-Key``, so the 500 requests are 500 rows, however the kill fell.
Runs on PostgreSQL + S3 and on SQLite + local files."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
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

from kontext_server.domain.jobs import JobStatus

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]

REQUESTS = 500
KILL_AFTER = 150  # acknowledged submits before API process A dies
CLIENTS = 16


class Burst:
    """``REQUESTS`` submits from ``CLIENTS`` threads, to A until it dies, then to B."""

    def __init__(self, api_a: ApiProcess, api_b: ApiProcess) -> None:
        self.api_a, self.api_b = api_a, api_b
        self.body = {"prompt": "burst", "image_url": input_image_uri()}
        self.acknowledged: dict[str, tuple[str, str]] = {}  # key -> (request id, API name)
        self.retried_on_b = 0
        self.a_killed = threading.Event()
        self._lock = threading.Lock()

    def submit(self, client: httpx.Client, index: int) -> None:
        key = f"burst-{index}"
        headers = {"Idempotency-Key": key}
        if not self.a_killed.is_set():
            try:
                answer = client.post(
                    f"{self.api_a.base_url}/{ENDPOINT}", json=self.body, headers=headers
                )
                self._acknowledge(key, answer, "A")
                return
            except httpx.TransportError:
                with self._lock:
                    self.retried_on_b += 1
        answer = client.post(f"{self.api_b.base_url}/{ENDPOINT}", json=self.body, headers=headers)
        self._acknowledge(key, answer, "B")

    def _acknowledge(self, key: str, answer: httpx.Response, api: str) -> None:
        assert answer.status_code == 200, answer.text
        with self._lock:
            self.acknowledged[key] = (answer.json()["request_id"], api)
            if api == "A" and len(self.acknowledged) >= KILL_AFTER and not self.a_killed.is_set():
                self.a_killed.set()
                self.api_a.kill9()


def test_every_acknowledged_submit_survives_the_kill_of_its_api_process_and_completes_once(
    backend: Backend, processes: Processes, tmp_path: Path
) -> None:
    api_a = ApiProcess(backend, tmp_path / "api-a")
    api_b = ApiProcess(backend, tmp_path / "api-b")
    for api in (api_a, api_b):
        processes.add(api)
        api.start()
    for i in range(2):
        worker = WorkerProcess(backend, tmp_path, f"w{i}", steps=1, step_s=0.0, lease_s=5.0)
        processes.add(worker)
        worker.start()

    burst = Burst(api_a, api_b)
    limits = httpx.Limits(max_connections=CLIENTS)
    with (
        httpx.Client(timeout=30.0, limits=limits) as client,
        ThreadPoolExecutor(CLIENTS) as pool,
    ):
        list(pool.map(lambda i: burst.submit(client, i), range(REQUESTS)))

    assert burst.a_killed.is_set() and not api_a.alive()
    assert len(burst.acknowledged) == REQUESTS
    ids = {request_id for request_id, _ in burst.acknowledged.values()}
    assert len(ids) == REQUESTS, "two keys were answered with the same request"
    by_a = sum(1 for _, api in burst.acknowledged.values() if api == "A")
    assert KILL_AFTER <= by_a < REQUESTS

    with opened(backend) as store:
        # Nothing acknowledged is lost, nothing is there twice: one row per key.
        assert all(store.get(request_id) is not None for request_id in ids)
        assert backend.count_jobs() == REQUESTS

        remaining = set(ids)

        def pending() -> set[str]:
            done = {i for i in remaining if store.get(i).status.is_final}  # type: ignore[union-attr]
            remaining.difference_update(done)
            return remaining

        wait_for(lambda: not pending(), timeout_s=90, poll_s=0.5, what="the burst to drain")
        jobs = [store.get(request_id) for request_id in ids]

    assert all(job is not None and job.status is JobStatus.SUCCEEDED for job in jobs), [
        (job.id, job.status, job.error)
        for job in jobs
        if job and job.status is not JobStatus.SUCCEEDED
    ]
    assert all(job is not None and job.attempts == 1 for job in jobs)
    keys = {
        image["file_key"] for job in jobs if job and job.result for image in job.result["images"]
    }
    assert len(keys) == REQUESTS
    assert stored_names(keys) == stored_names(backend.list_file_keys())
    print(f"acknowledged by A: {by_a}, by B: {REQUESTS - by_a}, retried on B: {burst.retried_on_b}")
