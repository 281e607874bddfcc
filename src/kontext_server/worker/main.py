"""A worker process: load the model once, then claim and run jobs until told to stop."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import uuid
from types import FrameType

from kontext_server.config import Settings
from kontext_server.fetch import SafeFetcher
from kontext_server.files import open_file_store
from kontext_server.store import open_store
from kontext_server.worker.runner import JobRunner, RunnerLimits

__all__ = ["make_fetcher", "run_worker"]

log = logging.getLogger(__name__)


def make_fetcher(settings: Settings) -> SafeFetcher:
    return SafeFetcher(
        allow_hosts=settings.fetch_allow_hosts,
        allow_ports=settings.fetch_allow_ports,
        timeout_s=settings.fetch_timeout_s,
        max_bytes=settings.max_image_bytes,
    )


def runner_limits(settings: Settings) -> RunnerLimits:
    return RunnerLimits(
        lease_s=settings.lease_s,
        heartbeat_s=settings.heartbeat_s,
        claim_poll_s=settings.claim_poll_s,
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
    )


def run_worker(settings: Settings, worker_id: str | None = None) -> None:
    """Run until SIGTERM/SIGINT; the job in hand is finished before the process exits."""
    from kontext_server.worker.pipeline import KontextPipeline  # torch lives behind this line

    worker_id = worker_id or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("worker %s: signal %d, finishing the job in hand", worker_id, signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    store = open_store(settings.store_url())
    files = open_file_store(settings.files_url())
    pipeline = KontextPipeline.from_settings(settings)
    runner = JobRunner(
        store,
        files,
        pipeline,
        make_fetcher(settings),
        worker_id=worker_id,
        limits=runner_limits(settings),
        model_name=settings.model,
    )
    log.info("worker %s ready (model %s)", worker_id, settings.model)
    try:
        runner.run_forever(stop)
    finally:
        runner.close()
        store.close()
        log.info("worker %s stopped", worker_id)
