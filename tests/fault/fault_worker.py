"""A real worker process around a fixture engine, on any job store and file store.

    python fault_worker.py ENGINE --store URL --files URL [--name NAME] [--lease-s S]
                           [--steps N] [--step-s S]

Everything but the engine is what ``kontext-server worker`` runs: the configured stores
(``open_configured_store`` / ``open_file_store``, so S3 settings come from ``KONTEXT_S3_*``),
a ``JobRunner`` with the production loop, and ``run_until_signalled`` (SIGTERM drains). The
worker id is ``NAME/PID`` so a test can tell which process holds a job.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fault_engines import make_engine

from kontext_server.config import Settings
from kontext_server.files import open_file_store
from kontext_server.store import open_configured_store
from kontext_server.worker.main import make_fetcher, run_until_signalled
from kontext_server.worker.runner import JobRunner, RunnerLimits


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=["slow", "poison", "stubborn"])
    parser.add_argument("--store", required=True)
    parser.add_argument("--files", required=True)
    parser.add_argument("--name", default="fault-worker")
    parser.add_argument("--lease-s", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--step-s", type=float, default=0.05)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s worker %(name)s: %(message)s"
    )
    settings = Settings(
        store=args.store, files=args.files, lease_s=args.lease_s, heartbeat_s=args.lease_s / 4
    )
    store = open_configured_store(settings)
    files = open_file_store(settings.files_url(), settings)
    runner = JobRunner(
        store,
        files,
        make_engine(args.engine, args.steps, args.step_s),
        make_fetcher(settings),
        worker_id=f"{args.name}/{os.getpid()}",
        limits=RunnerLimits(lease_s=args.lease_s, heartbeat_s=args.lease_s / 4),
    )
    logging.getLogger("fault").info("worker %s/%d ready", args.name, os.getpid())
    try:
        run_until_signalled(runner, drain_timeout_s=5.0)
    finally:
        runner.close()
        store.close()


if __name__ == "__main__":
    main(sys.argv[1:])
