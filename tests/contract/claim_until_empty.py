"""Fixture program for the multi-process test: one worker process draining a shared store.

Usage: ``python claim_until_empty.py STORE_URL WORKER_ID``. Prints ``ready`` once the store is
open, waits for a line on stdin (so that several processes start claiming together), then
claims and finishes jobs until none is left, printing each claimed job id.
"""

from __future__ import annotations

import sys

from kontext_server.domain.jobs import JobStatus
from kontext_server.store import open_store


def main(store_url: str, worker_id: str) -> None:
    store = open_store(store_url)
    print("ready", flush=True)
    sys.stdin.readline()
    while (job := store.claim(worker_id, lease_s=60)) is not None:
        store.finish(job.id, worker_id, job.attempts, JobStatus.SUCCEEDED, result={})
        print(job.id, flush=True)
    store.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
