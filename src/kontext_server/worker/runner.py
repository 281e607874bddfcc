"""``JobRunner``: the worker loop (``worker.loop``) on the local engine
(``worker.local_engine``): claim a job, run the edit on this machine, publish the images,
finish with a fenced write. One job at a time; the execution timeout (``job_timeout_s``) ends
the process, and a drain hands the job in hand back when its time is up.

Torch-free: the pipeline arrives as an ``EditPipeline``, so the loop is tested with
hand-written fake engines as well as with the real tiny diffusers pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from kontext_server.domain.editing import EditPipeline
from kontext_server.files.base import FileStore
from kontext_server.metrics import JobMetrics
from kontext_server.net.fetch import SafeFetcher
from kontext_server.store.base import JobStore
from kontext_server.worker.local_engine import LocalEngine, RunnerLimits
from kontext_server.worker.loop import WorkerLoop
from kontext_server.worker.safety_policy import ContentSafety

__all__ = ["JobRunner", "RunnerLimits"]


class JobRunner(WorkerLoop[LocalEngine]):
    """Runs jobs from ``store`` on ``pipeline``, one at a time (one request per GPU).

    ``exit_process(code)`` ends the process after an execution timeout (default ``os._exit``,
    which skips cleanup on purpose: the main thread may be stuck in the GPU). Tests pass a
    recorder instead so that pytest survives.
    """

    def __init__(
        self,
        store: JobStore,
        files: FileStore,
        pipeline: EditPipeline,
        fetcher: SafeFetcher,
        *,
        worker_id: str,
        limits: RunnerLimits | None = None,
        model_name: str = "",
        exit_process: Callable[[int], object] = os._exit,
        metrics: JobMetrics | None = None,
        safety: ContentSafety | None = None,
    ) -> None:
        engine = LocalEngine(
            store, files, pipeline, fetcher, limits=limits, model_name=model_name, safety=safety
        )
        super().__init__(
            store, engine, worker_id=worker_id, metrics=metrics, exit_process=exit_process
        )
