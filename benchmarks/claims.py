"""Claims per second with N worker processes draining one job store (SQLite and PostgreSQL).

``--jobs`` jobs are queued first; then ``--workers`` processes (8 by default), started
together, each loop ``claim`` + ``finish`` (a no-op job) until the queue is empty. Claims
per second = jobs / wall time from the start signal to the last worker done. This is the
store's ceiling for dispatch (how many GPUs one store can keep busy at a given job length),
not an edit rate. Prints one JSON object.

    .venv/bin/python benchmarks/claims.py [--store both|sqlite|postgres] [--workers 8]
        [--jobs 4000] [--dsn postgresql://...]

PostgreSQL: without ``--dsn`` a throwaway cluster is started (``initdb`` + ``pg_ctl`` on a
private socket, ``fsync`` off, as in the tests; see ``queue_position.py``). With ``--dsn``,
give an empty scratch database: its job tables are emptied first.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from kontext_server.domain.editing import EditInput
from kontext_server.domain.jobs import JobStatus, NewJob
from kontext_server.store.base import JobStore

__all__ = ["run"]

LEASE_S = 300.0
RESULT = {"images": [{"url": "http://127.0.0.1/files/x.jpeg", "file_key": "x.jpeg"}], "seed": 1}


def _open(kind: str, url: str) -> JobStore:
    if kind == "sqlite":
        from kontext_server.store.sqlite import SQLiteJobStore

        return SQLiteJobStore(url)
    from kontext_server.store.postgres import PostgresJobStore

    return PostgresJobStore(url, pool_max=2)


def _worker(kind: str, url: str, name: str, go: Event, results: Any) -> None:
    """One worker process: claim + finish until the queue is empty; reports its loop times."""
    store = _open(kind, url)
    store.queue_depth()  # connected before the start signal
    results.put(("ready", name, []))
    go.wait()
    loops_ms = []
    while True:
        started = time.perf_counter_ns()
        job = store.claim(name, LEASE_S)
        if job is None:
            break
        store.finish(job.id, name, job.attempts, JobStatus.SUCCEEDED, result=RESULT)
        loops_ms.append((time.perf_counter_ns() - started) / 1e6)
    store.close()
    results.put(("done", name, loops_ms))


def _queue_jobs(store: JobStore, jobs: int) -> None:
    for _ in range(jobs):
        store.submit(
            NewJob(
                id=str(uuid.uuid4()),
                endpoint="fal-ai/flux-pro/kontext",
                input=EditInput(prompt="x"),
            )
        )


def measure(kind: str, url: str, workers: int, jobs: int) -> dict[str, Any]:
    """Queue ``jobs`` in the store at ``url``, then drain it with ``workers`` processes."""
    store = _open(kind, url)
    try:
        _queue_jobs(store, jobs)
        context = multiprocessing.get_context("spawn")
        go = context.Event()
        results = context.Queue()
        processes = [
            context.Process(target=_worker, args=(kind, url, f"worker-{n}", go, results))
            for n in range(workers)
        ]
        for process in processes:
            process.start()
        for _ in processes:
            if results.get(timeout=120)[0] != "ready":
                raise RuntimeError("a worker finished before the start signal")
        started = time.perf_counter()
        go.set()
        loops_ms: list[float] = []
        for _ in processes:
            _, _, mine = results.get(timeout=600)
            loops_ms += mine
        elapsed_s = time.perf_counter() - started
        for process in processes:
            process.join(timeout=60)
        if len(loops_ms) != jobs or store.queue_depth() != 0:
            raise RuntimeError(f"{len(loops_ms)} claims for {jobs} jobs: the store lost some")
    finally:
        store.close()
    return {
        "store": kind,
        "workers": workers,
        "jobs": jobs,
        "seconds": round(elapsed_s, 3),
        "claims_per_s": round(jobs / elapsed_s, 1),
        "claim_and_finish_p50_ms": round(statistics.median(loops_ms), 3),
        "claim_and_finish_p99_ms": round(
            statistics.quantiles(loops_ms, n=100, method="inclusive")[98], 3
        ),
    }


@contextmanager
def _sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="kontext-claims-") as folder:
        yield str(Path(folder) / "jobs.db")


def _postgres_database(dsn: str | None) -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from queue_position import postgres_database  # the sibling benchmark's helper

    return postgres_database(dsn)


def run(
    stores: tuple[str, ...] = ("sqlite", "postgres"),
    workers: int = 8,
    jobs: int = 4000,
    dsn: str | None = None,
) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "benchmark": "claims",
        "environment": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
    }
    for kind in stores:
        database = _sqlite_url() if kind == "sqlite" else _postgres_database(dsn)
        with database as url:
            figures[kind] = measure(kind, url, workers, jobs)
    figures["environment"]["load_average_1m"] = round(os.getloadavg()[0], 2)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--store", choices=["both", "sqlite", "postgres"], default="both")
    parser.add_argument("--workers", type=int, default=8, help="worker processes (default 8)")
    parser.add_argument("--jobs", type=int, default=4000, help="jobs queued (default 4000)")
    parser.add_argument("--dsn", default=None, help="postgres: an empty scratch database")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.jobs < args.workers:
        parser.error("need --workers >= 1 and --jobs >= --workers")
    stores = ("sqlite", "postgres") if args.store == "both" else (args.store,)
    print(json.dumps(run(stores, args.workers, args.jobs, args.dsn), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
