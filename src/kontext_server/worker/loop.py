"""The worker loop: claim a job, keep its lease, run it on an engine, record the outcome.

One loop for every engine (``worker.engine``). The local engine takes one job at a time and
runs it in the loop's own thread (the GPU work); an engine with a capacity above one (the
upstream engine) keeps that many jobs in flight, one thread each (they mostly sleep between
polls). Each job has a lease thread that
renews its lease every ``heartbeat_s``; a lost lease (another worker took the job over) is
seen by the engine at its next check and the attempt records nothing.

Two limits end a run early:

* **Watchdog** (``Engine.watchdog_s``, the local engine's ``job_timeout_s``): the lease
  thread fails the job (``execution_timeout``, with the fenced finish) and then ends the whole
  process (``EXIT_EXECUTION_TIMEOUT``): a stuck CUDA call cannot be interrupted from Python,
  so the only way to free the GPU is a fresh process, which the supervisor starts. An engine
  without a watchdog (the upstream one) keeps its own time instead.
* **Drain** (``WorkerLoop.drain``, on SIGTERM): no more claims; the jobs in hand may finish
  within the drain time, else the engine stops them at their next check and they are handed
  back to the queue (``JobStore.release``: their place kept, the attempt not counted).

The loop's writes are fenced by the claim's attempt (``finish``, ``release``, ``heartbeat``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from types import FrameType
from typing import Any, Generic, TypeVar

from kontext_server.domain.errors import EditCancelled, InputError, StoreError
from kontext_server.domain.jobs import Job, JobStatus
from kontext_server.logs import request_context
from kontext_server.metrics import JobMetrics
from kontext_server.store.base import JobStore
from kontext_server.worker.drain import DrainDeadline
from kontext_server.worker.engine import (
    EXECUTION_TIMEOUT_ERROR_TYPE,
    Abandoned,
    Engine,
    HandBack,
    JobContext,
    JobFailed,
    LeaseLimits,
)
from kontext_server.worker.exit_codes import EXIT_EXECUTION_TIMEOUT

__all__ = ["WorkerLoop", "default_worker_id", "run_until_signalled"]

log = logging.getLogger(__name__)

CANCELLED_MESSAGE = "Request cancelled"
STORE_RETRY_S = 1.0  # pause of the worker loop while the job store is unreachable

EngineT = TypeVar("EngineT", bound=Engine)
Outcome = tuple[JobStatus | None, dict[str, Any]]  # None: abandoned (the lease moved)


class _Lease:
    """Keeps one job's lease alive from a thread of its own, and watches its run time.

    The GPU work runs in the loop's thread; torch releases the GIL inside kernels and Python
    switches threads every few milliseconds, so a long denoising step cannot starve this
    heartbeat. A lost lease (another worker took the job over) sets ``lost``. With a
    ``watchdog_s``, if the work has not returned that long after the start, ``on_timeout``
    runs on this thread (also after a lost lease: a stuck process must go whoever owns the
    job now)."""

    def __init__(
        self,
        store: JobStore,
        job: Job,
        worker_id: str,
        limits: LeaseLimits,
        watchdog_s: float | None,
        on_timeout: Callable[[_Lease], None],
    ) -> None:
        self._store, self.job, self._worker_id, self._limits = store, job, worker_id, limits
        self._on_timeout = on_timeout
        self._deadline = None if watchdog_s is None else time.monotonic() + watchdog_s
        self._stop = threading.Event()
        self.lost = threading.Event()
        self.work_returned = threading.Event()  # set by the loop: nothing is stuck any more
        self._thread = threading.Thread(target=self._watch, name=f"lease-{job.id}", daemon=True)

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self._next_wake_s()):
            if self._deadline is not None and time.monotonic() >= self._deadline:
                if not self.work_returned.is_set():
                    self._on_timeout(self)
                return
            if not self.lost.is_set():
                self._renew()

    def _next_wake_s(self) -> float | None:
        """None: nothing to watch any more (lease lost, no watchdog), wait for the end."""
        if self._deadline is None:
            return None if self.lost.is_set() else self._limits.heartbeat_s
        until_deadline_s = max(0.0, self._deadline - time.monotonic())
        return (
            until_deadline_s
            if self.lost.is_set()
            else min(self._limits.heartbeat_s, until_deadline_s)
        )

    def _renew(self) -> None:
        try:
            alive = self._store.heartbeat(
                self.job.id, self._worker_id, self.job.attempts, self._limits.lease_s
            )
        except Exception:  # a busy database must not kill the heartbeat; retry next beat
            log.exception("heartbeat of %s failed", self.job.id)
            return
        if not alive:
            log.warning("lease of %s lost; abandoning this attempt", self.job.id)
            self.lost.set()


class WorkerLoop(Generic[EngineT]):
    """Runs jobs from ``store`` on ``engine`` (see the module docstring). ``drain`` may be
    called from a signal handler.

    ``exit_process(code)`` ends the process when the watchdog fires (default ``os._exit``,
    which skips cleanup on purpose: the main thread may be stuck in the GPU). Tests pass a
    recorder instead so that pytest survives."""

    def __init__(
        self,
        store: JobStore,
        engine: EngineT,
        *,
        worker_id: str,
        metrics: JobMetrics | None = None,
        exit_process: Callable[[int], object] = os._exit,
    ) -> None:
        self.store, self.engine, self.worker_id = store, engine, worker_id
        self.metrics = metrics
        self._exit_process = exit_process
        self._drain = DrainDeadline()
        self._in_flight: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._slot_freed = threading.Event()

    # --- the loop ------------------------------------------------------------------------------
    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Claim and run jobs until ``stop`` is set or ``drain`` is called; then wait for
        the jobs in flight (a drain hands them back when its time is up)."""
        stop = stop or threading.Event()
        while not stop.is_set() and not self.draining:
            try:
                if not self.run_next():
                    self._wait_for_slot_or_work()
            except StoreError as exc:
                # The job store is unreachable (a PostgreSQL restart or failover): keep the
                # process (and a loaded model), and try again. A job cut short by the outage
                # keeps its lease until it expires; then it is re-queued (fenced writes).
                log.warning("%s; the worker retries in %g s", exc, STORE_RETRY_S)
                stop.wait(STORE_RETRY_S)
        self._wait_for_in_flight()

    def run_next(self) -> bool:
        """Claim one job and run it (to its end in this thread when the engine takes one at a
        time, else started on a thread of its own); False when no slot is free or nothing
        was queued."""
        if self.in_flight_count >= self.engine.capacity:
            return False
        job = self.store.claim(self.worker_id, self.engine.limits.lease_s, engine=self.engine.name)
        if job is None:
            self.engine.idle()
            return False
        if self.draining:  # the drain began while this claim was on its way: give it back
            self.store.release(job.id, self.worker_id, job.attempts)
            return True
        if self.engine.capacity == 1:
            self.run(job)
        else:
            self.start(job)
        return True

    def _wait_for_slot_or_work(self) -> None:
        # Returns as soon as work may be there (PostgreSQL NOTIFY, SQLite polling every few
        # ms) or a slot is freed, so an idle worker starts a new job quickly.
        idle_wait_s = self.engine.limits.idle_wait_s
        if self.in_flight_count >= self.engine.capacity:
            self._slot_freed.wait(idle_wait_s)
            self._slot_freed.clear()
        else:
            self.store.wait_for_work(idle_wait_s, engine=self.engine.name)

    def _wait_for_in_flight(self) -> None:
        with self._lock:
            threads = list(self._in_flight.values())
        for thread in threads:
            thread.join()

    @property
    def in_flight_count(self) -> int:
        """Jobs running on threads of their own (``start``)."""
        with self._lock:
            return len(self._in_flight)

    def start(self, job: Job) -> threading.Thread:
        """Run a claimed job on a thread of its own; returns the thread."""
        thread = threading.Thread(
            target=self._run_and_forget,
            args=(job,),
            name=f"{self.engine.name}-{job.id}",
            daemon=True,
        )
        with self._lock:
            self._in_flight[job.id] = thread
        thread.start()
        return thread

    def _run_and_forget(self, job: Job) -> None:
        try:
            self.run(job)
        finally:
            with self._lock:
                self._in_flight.pop(job.id, None)
            self._slot_freed.set()

    def drain(self, timeout_s: float) -> None:
        """Stop claiming now. The jobs in hand may run ``timeout_s`` more; then they are
        stopped at their next check and handed back to the queue (their place kept, the
        attempt not counted). Safe to call from a signal handler; a later call can only
        shorten the time. (Nothing here takes a lock: a waiting loop sees the drain at its
        next wake, within ``idle_wait_s``.)"""
        self._drain.request(timeout_s)

    @property
    def draining(self) -> bool:
        return self._drain.active

    def close(self) -> None:
        self.engine.close()

    # --- one job ---------------------------------------------------------------------------
    def run(self, job: Job) -> None:
        """Run one claimed job to its end: finished (fenced), handed back when a drain ran
        out of time, or abandoned when its lease moved. The watchdog ends the process from
        the lease thread."""
        started = time.perf_counter()
        if self.metrics:
            self.metrics.job_started(job)
        with request_context(job.id):
            lease = _Lease(
                self.store,
                job,
                self.worker_id,
                self.engine.limits,
                self.engine.watchdog_s,
                self._time_out,
            )
            with lease:
                ctx = JobContext(job, self.worker_id, lease.lost, self._drain)
                status, fields = self._outcome(ctx)
                lease.work_returned.set()
                if status is None:
                    log.info("job %s abandoned: its lease moved to another worker", job.id)
                    return
                if lease.lost.is_set():  # another attempt owns the job: a write would be refused
                    log.info("job %s not recorded: its lease moved to another worker", job.id)
                    return
                recorded = self._record(job, status, fields)
                if self.metrics and recorded and status is not JobStatus.QUEUED:
                    run_s = time.perf_counter() - started
                    error_type = fields.get("error_type")
                    self.metrics.job_finished(job, status, error_type, run_s, ctx.edit)
            log.info(
                "job %s %s in %.3f s%s",
                job.id,
                "handed back" if status is JobStatus.QUEUED else status.value,
                time.perf_counter() - started,
                "" if recorded else " (not recorded: lease lost)",
            )

    def _outcome(self, ctx: JobContext) -> Outcome:
        """The job's outcome: a final status with its fields, ``QUEUED`` to hand it back, or
        None (abandoned)."""
        job = ctx.job
        try:
            return JobStatus.SUCCEEDED, {"result": self.engine.execute(ctx).to_record()}
        except Abandoned:
            return None, {}
        except HandBack:
            return JobStatus.QUEUED, {}
        except EditCancelled:
            return JobStatus.CANCELED, {
                "error": CANCELLED_MESSAGE,
                "error_type": "client_cancelled",
            }
        except (InputError, JobFailed) as exc:
            data = exc.data if isinstance(exc, JobFailed) and exc.data else None
            self.store.add_event(job.id, str(exc), level="ERROR", data=data)
            return JobStatus.FAILED, {"error": str(exc), "error_type": exc.error_type}
        except Exception as exc:
            log.exception("job %s failed", job.id)
            message = f"internal error: {type(exc).__name__}: {exc}"
            self.store.add_event(job.id, message, level="ERROR")
            return JobStatus.FAILED, {"error": message, "error_type": "internal_error"}

    def _record(self, job: Job, status: JobStatus, fields: dict[str, Any]) -> bool:
        if status is JobStatus.QUEUED:
            return self.store.release(job.id, self.worker_id, job.attempts)
        fields.setdefault("result", None)
        return self.store.finish(job.id, self.worker_id, job.attempts, status, **fields)

    def _time_out(self, lease: _Lease) -> None:
        """On the lease thread, when the run passed ``watchdog_s``: fail the job, then end
        the process (the edit may be stuck where Python cannot interrupt it)."""
        job = lease.job
        message = f"the edit ran longer than {self.engine.watchdog_s:g} s; its worker was replaced"
        log.error("job %s: %s; ending worker process %d", job.id, message, os.getpid())
        lease.lost.set()  # this attempt is over: if the edit ever returns, it records nothing
        try:
            self.store.finish(
                job.id,
                self.worker_id,
                job.attempts,
                JobStatus.FAILED,
                result=None,
                error=message,
                error_type=EXECUTION_TIMEOUT_ERROR_TYPE,
            )
        except Exception:  # the store is unreachable: the lease expires and the job is re-queued
            log.exception("cannot record the execution timeout of job %s", job.id)
        self._exit_process(EXIT_EXECUTION_TIMEOUT)


def default_worker_id(tag: str = "") -> str:
    """``host/pid/<tag><8 hex>``: unique per process, and says where it runs."""
    return f"{socket.gethostname()}/{os.getpid()}/{tag}{uuid.uuid4().hex[:8]}"


def run_until_signalled(loop: WorkerLoop[Any], *, drain_timeout_s: float) -> None:
    """Run ``loop`` until SIGTERM or SIGINT, then drain it: the jobs in hand may run
    ``drain_timeout_s`` more before they are handed back; a second signal hands them back at
    their next check. Returns once nothing is in hand. Call from the main thread (signal
    handlers)."""
    signals_seen = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals_seen
        signals_seen += 1
        timeout_s = drain_timeout_s if signals_seen == 1 else 0.0
        log.info(
            "worker %s: signal %d, draining (the jobs in hand have %.1f s to finish)",
            loop.worker_id,
            signum,
            timeout_s,
        )
        loop.drain(timeout_s)

    previous: dict[signal.Signals, Any] = {
        signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        loop.run_forever()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
