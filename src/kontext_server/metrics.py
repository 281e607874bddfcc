"""Prometheus metrics of the API and the workers.

* Single node (``serve``): workers are child processes, so prometheus_client's multiprocess
  mode adds up their samples through files in ``<data_dir>/metrics`` (``serve`` sets
  ``PROMETHEUS_MULTIPROC_DIR`` for itself and its workers before anything imports
  prometheus_client) and the API's ``/metrics`` shows them all.
* Remote workers (``kontext-server worker --metrics-port N``) serve their own ``/metrics``.
* Queue depth is read from the job store at scrape time, so every API process reports the
  same truth.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector

from kontext_server.domain.editing import EditResult
from kontext_server.domain.jobs import Job, JobStatus
from kontext_server.store.base import JobStore

__all__ = [
    "MULTIPROC_ENV",
    "SUBMIT_BATCH_SIZE",
    "JobMetrics",
    "QueueCollector",
    "prepare_multiprocess_dir",
    "render_metrics",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 900)

JOBS_FINISHED = Counter(
    "kontext_jobs_finished_total", "Jobs finished by workers", ["endpoint", "status"]
)
JOB_FAILURES = Counter("kontext_job_failures_total", "Failed jobs by error_type", ["error_type"])
WAIT_SECONDS = Histogram(
    "kontext_job_wait_seconds", "Submit to start", ["endpoint"], buckets=_LATENCY_BUCKETS_S
)
RUN_SECONDS = Histogram(
    "kontext_job_run_seconds",
    "Start to finish on a worker",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS_S,
)
STEPS = Counter("kontext_denoising_steps_total", "Denoising steps run")
STEP_SECONDS = Counter("kontext_denoising_seconds_total", "Seconds spent denoising")
STEPS_PER_SECOND = Gauge(
    "kontext_denoising_steps_per_second",
    "Steps per second of the last job, per worker process",
    multiprocess_mode="liveall",
)
WORKERS = Gauge("kontext_workers", "Worker processes alive", multiprocess_mode="livesum")
SUBMIT_BATCH_SIZE = Histogram(
    "kontext_submit_batch_size",
    "Submits committed together in one job-store transaction (group commit)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
GPU_MEMORY = Gauge(
    "kontext_gpu_memory_bytes",
    "CUDA memory of the last job (allocated, peak), per worker process",
    ["kind"],
    multiprocess_mode="liveall",
)


def prepare_multiprocess_dir(path: Path) -> None:
    """Empty ``path`` and point prometheus_client (this process and its children) at it.

    Must run before prometheus_client is imported anywhere in this process."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)


class JobMetrics:
    """What a worker records about the jobs it runs."""

    def worker_started(self) -> None:
        WORKERS.inc()

    def job_started(self, job: Job) -> None:
        started_at = job.started_at or time.time()
        WAIT_SECONDS.labels(job.endpoint).observe(max(0.0, started_at - job.created_at))

    def job_finished(
        self,
        job: Job,
        status: JobStatus,
        error_type: str | None,
        run_s: float,
        result: EditResult | None,
    ) -> None:
        JOBS_FINISHED.labels(job.endpoint, status.value).inc()
        RUN_SECONDS.labels(job.endpoint).observe(run_s)
        if status is JobStatus.FAILED:
            JOB_FAILURES.labels(error_type or "internal_error").inc()
        if result is None:
            return
        inference_s = result.timings.get("inference", 0.0)
        if result.steps and inference_s > 0:
            STEPS.inc(result.steps)
            STEP_SECONDS.inc(inference_s)
            STEPS_PER_SECOND.set(result.steps / inference_s)
        for kind, value in result.gpu_memory_bytes.items():
            GPU_MEMORY.labels(kind).set(value)


class QueueCollector(Collector):
    """``kontext_queue_depth{endpoint,priority,state}`` read from the store at scrape time."""

    def __init__(self, store: JobStore) -> None:
        self._store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "kontext_queue_depth",
            "Queued and running jobs by endpoint and priority",
            labels=["endpoint", "priority", "state"],
        )
        for depth in self._store.queue_depths():
            priority = "normal" if depth.priority == 0 else "low"
            family.add_metric([depth.endpoint, priority, "queued"], depth.queued)
            family.add_metric([depth.endpoint, priority, "running"], depth.running)
        yield family


def render_metrics(store: JobStore | None, multiprocess_dir: Path | None = None) -> bytes:
    """The exposition text: worker samples (multiprocess files or this process) + queue."""
    registry = REGISTRY
    if multiprocess_dir is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]
    if store is None:
        return generate_latest(registry)
    queue = CollectorRegistry()
    queue.register(QueueCollector(store))
    return generate_latest(registry) + generate_latest(queue)
