"""A worker process: load the model once, then claim and run jobs until told to stop.

SIGTERM (or SIGINT) drains: no more claims, the job in hand may finish within
``drain_timeout_s``, else it is handed back to the queue at its next step; then the process
exits 0. A second signal hands the job back at once. While the model loads no handler is
installed yet, so a signal ends the process at once (there is no job to care for, and loading
real weights can take minutes).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from prometheus_client import start_http_server

from kontext_server.config import Settings
from kontext_server.domain.errors import KontextError
from kontext_server.files import open_file_store
from kontext_server.metrics import JobMetrics
from kontext_server.net.fetch import SafeFetcher
from kontext_server.store import open_configured_store
from kontext_server.worker.exit_codes import EXIT_START_FAILED
from kontext_server.worker.loop import default_worker_id, run_until_signalled
from kontext_server.worker.runner import JobRunner, RunnerLimits
from kontext_server.worker.state import WorkerStates

if TYPE_CHECKING:
    from kontext_server.worker.pipeline import KontextPipeline

__all__ = ["make_fetcher", "run_until_signalled", "run_worker", "runner_limits", "warm_up"]

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
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        job_timeout_s=settings.job_timeout_s,
        prefetch_jobs=settings.prefetch_jobs,
    )


def run_worker(settings: Settings, worker_id: str | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain (see the module docstring) and return."""
    from kontext_server.worker.pipeline import KontextPipeline  # torch lives behind this line

    worker_id = worker_id or default_worker_id()
    metrics = JobMetrics()
    metrics.worker_started()
    if settings.metrics_port is not None:  # a remote worker: Prometheus scrapes it directly
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
    states = WorkerStates(settings.data_dir / "workers")
    states.write("loading", f"model {settings.model}")
    try:
        pipeline = KontextPipeline.from_settings(settings)
        warm_up(pipeline, settings, states)
    except Exception as exc:  # a load error, or an OOM in warm-up: say so, do not loop
        reason = str(exc) if isinstance(exc, KontextError) else f"{type(exc).__name__}: {exc}"
        log.exception("worker %s cannot start: %s", worker_id, reason)
        states.write("failed", reason)  # read by serve's /readyz, removed by its supervisor
        raise SystemExit(EXIT_START_FAILED) from exc
    try:
        _serve_jobs(settings, worker_id, pipeline, metrics, states)
    finally:
        states.remove(os.getpid())


def _serve_jobs(
    settings: Settings,
    worker_id: str,
    pipeline: KontextPipeline,
    metrics: JobMetrics,
    states: WorkerStates,
) -> None:
    from kontext_server.worker.safety import content_safety_from_settings

    store = open_configured_store(settings)
    files = open_file_store(settings.files_url(), settings)
    safety = content_safety_from_settings(settings)  # says so in the log when there is none
    runner = JobRunner(
        store,
        files,
        pipeline,
        make_fetcher(settings),
        worker_id=worker_id,
        limits=runner_limits(settings),
        model_name=settings.model,
        metrics=metrics,
        safety=safety,
    )
    log.info(
        "worker %s ready (model %s, %s)",
        worker_id,
        settings.model,
        pipeline.acceleration.describe(),
    )
    states.write("ready", pipeline.acceleration.describe())
    try:
        run_until_signalled(runner, drain_timeout_s=settings.drain_timeout_s)
    finally:
        runner.close()
        store.close()
        log.info("worker %s stopped", worker_id)


def warm_up(pipeline: KontextPipeline, settings: Settings, states: WorkerStates) -> None:
    """Compile (a compiling preset) or load the GPU kernels once, before the first claim, so
    that no request pays for it; the state file says so meanwhile. Skipped with
    ``KONTEXT_WARMUP=false``, and for an eager engine on the CPU (nothing to warm)."""
    if not settings.warmup:
        return
    if not pipeline.acceleration.compiles and pipeline.device.type == "cpu":
        return
    what = "compiling" if pipeline.acceleration.compiles else "warming up"
    states.write("warming up", f"{what}: {pipeline.acceleration.describe()}")
    log.info("worker: %s before the first request (%s)", what, pipeline.acceleration.describe())
    seconds = pipeline.warmup()
    log.info("worker: warm-up took %.1f s", seconds)
