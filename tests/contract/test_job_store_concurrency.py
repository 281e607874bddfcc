"""Conformance: claims are atomic across threads and across processes, on every backend."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from kontext_server.domain.jobs import JobStatus, NewJob
from kontext_server.store.base import JobStore

MakeJob = Callable[..., NewJob]
CLAIMER = Path(__file__).with_name("claim_until_empty.py")


def status_of(store: JobStore, job_id: str) -> JobStatus:
    job = store.get(job_id)
    assert job is not None
    return job.status


def test_threads_claiming_together_get_each_job_exactly_once(
    store: JobStore, make_job: MakeJob
) -> None:
    ids = [store.submit(make_job())[0].id for _ in range(200)]
    claimed: list[list[str]] = [[] for _ in range(8)]
    barrier = threading.Barrier(len(claimed))

    def drain(mine: list[str]) -> None:
        barrier.wait()
        while (job := store.claim(f"worker-{id(mine)}", 30)) is not None:
            mine.append(job.id)

    threads = [threading.Thread(target=drain, args=(mine,)) for mine in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [job_id for mine in claimed for job_id in mine]
    assert sorted(everything) == sorted(ids)
    assert {status_of(store, job_id) for job_id in ids} == {JobStatus.RUNNING}


def start_claimer(store_url: str, worker_id: str) -> subprocess.Popen[str]:
    claimer = subprocess.Popen(
        [sys.executable, str(CLAIMER), store_url, worker_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert claimer.stdout is not None
    assert claimer.stdout.readline().strip() == "ready"
    return claimer


def collect_claimed_ids(claimers: list[subprocess.Popen[str]]) -> list[str]:
    """Lets every claimer go at once, then gathers what each printed."""
    for claimer in claimers:
        assert claimer.stdin is not None
        claimer.stdin.write("go\n")
        claimer.stdin.close()
    claimed = []
    for claimer in claimers:
        assert claimer.stdout is not None
        claimed += claimer.stdout.read().split()  # ~11 kB per claimer: fits a pipe's buffer
        assert claimer.wait(timeout=60) == 0
    return claimed


def test_processes_claiming_from_one_store_get_each_job_exactly_once(
    store: JobStore, store_url: str, make_job: MakeJob
) -> None:
    ids = [store.submit(make_job())[0].id for _ in range(300)]
    claimers = [start_claimer(store_url, f"process-{n}") for n in range(2)]
    try:
        claimed = collect_claimed_ids(claimers)
    finally:
        for claimer in claimers:
            claimer.kill()
            claimer.wait()
    assert sorted(claimed) == sorted(ids)
    assert store.queue_depth() == 0
    assert {status_of(store, job_id) for job_id in ids} == {JobStatus.SUCCEEDED}
