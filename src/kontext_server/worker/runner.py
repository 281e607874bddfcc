"""The worker loop: claim a job, run the edit, publish the images, finish with a fenced write.

Two limits end a run early:

* **Execution timeout** (``RunnerLimits.job_timeout_s``): the lease thread fails the job
  (``execution_timeout``, with the fenced finish) and then ends the whole process
  (``EXIT_EXECUTION_TIMEOUT``): a stuck CUDA call cannot be interrupted from Python, so the
  only way to free the GPU is a fresh process, which the supervisor starts.
* **Drain** (``JobRunner.drain``, on SIGTERM): no more claims; the job in hand may finish
  within the drain time, else it is interrupted at its next step and handed back to the queue
  (``JobStore.release``: its place kept, the attempt not counted).

**Input prefetch** (``RunnerLimits.prefetch_jobs``): once the job in hand has its own
reference images, the runner looks at the next queued job(s) (``JobStore.peek_queued``) and
fetches and decodes their images on its I/O threads while the edit runs, with the same rules
and limits. When this worker claims such a job, it takes the images from that small cache
instead of fetching again; entries of jobs that another worker took, or that were canceled,
are dropped. A prefetch failure is only logged (debug): the claimed job fetches as usual and
reports the error. Prompt and input checks run on the claimed job as always.

This module is torch-free: the engine arrives as an ``EditPipeline``, so the loop is tested
with hand-written fake engines as well as with the real tiny diffusers pipeline.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

from PIL import Image

from kontext_server.core.uploads import read_own_file
from kontext_server.domain.editing import (
    EditPipeline,
    EditRequest,
    EditResult,
    EncodedImage,
    OutputFormat,
    RequestAcceleration,
)
from kontext_server.domain.errors import EditCancelled, InputError, StoreError
from kontext_server.domain.jobs import Job, JobStatus, Progress
from kontext_server.files.base import FileStore, new_file_key
from kontext_server.logs import request_context
from kontext_server.metrics import JobMetrics
from kontext_server.net.fetch import SafeFetcher, load_image_bytes
from kontext_server.store.base import JobStore
from kontext_server.worker import imaging
from kontext_server.worker.drain import DrainDeadline
from kontext_server.worker.exit_codes import EXIT_EXECUTION_TIMEOUT
from kontext_server.worker.safety_policy import ContentSafety, SafetyPolicy, level_of

__all__ = ["EXECUTION_TIMEOUT_ERROR_TYPE", "JobRunner", "RunnerLimits"]

log = logging.getLogger(__name__)

CANCELLED_MESSAGE = "Request cancelled"
EXECUTION_TIMEOUT_ERROR_TYPE = "execution_timeout"  # ours: fal has no word for it
STORE_RETRY_S = 1.0  # pause of the worker loop while the job store is unreachable


@dataclass(frozen=True, slots=True)
class RunnerLimits:
    lease_s: float = 20.0
    heartbeat_s: float = 2.0
    idle_wait_s: float = 0.5  # longest wait for work between claims when idle (woken earlier)
    progress_interval_s: float = 0.1  # progress writes are throttled, the last step never is
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    job_timeout_s: float = 900.0  # a run longer than this fails and the process is replaced
    prefetch_jobs: int = 1  # queued jobs whose inputs are fetched during the current edit; 0: off


class _ProgressWriter:
    """One job's progress writes, off the denoising loop: at most one write in flight, and a
    report made meanwhile replaces any older one not yet written (coalesced). A step never
    waits for the store, and a slow store (a network round trip per write on PostgreSQL) gets
    fewer writes instead of a backlog. A failed write is logged and dropped: progress is a
    hint, and the lease and the final write report a lost store."""

    def __init__(self, store: JobStore, job: Job, worker_id: str, io: ThreadPoolExecutor) -> None:
        self._store, self._job, self._worker_id, self._io = store, job, worker_id, io
        self._lock = threading.Lock()
        self._pending: Progress | None = None
        self._writing: Future[None] | None = None

    def report(self, progress: Progress) -> None:
        with self._lock:
            self._pending = progress
            if self._writing is None:
                self._writing = self._io.submit(self._write_pending)

    def _write_pending(self) -> None:
        while True:
            with self._lock:
                progress, self._pending = self._pending, None
                if progress is None:
                    self._writing = None
                    return
            try:
                self._store.set_progress(
                    self._job.id, self._worker_id, self._job.attempts, progress
                )
            except Exception as exc:
                log.warning("cannot record the progress of job %s: %s", self._job.id, exc)

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until every report is written (or ``timeout_s``)."""
        with self._lock:
            writing = self._writing
        if writing is not None:
            with contextlib.suppress(Exception):
                writing.result(timeout=timeout_s)


class _Lease:
    """Keeps one job's lease alive from a thread of its own, and watches its execution time.

    The GPU work runs in the caller's thread; torch releases the GIL inside kernels and Python
    switches threads every few milliseconds, so a long denoising step cannot starve this
    heartbeat. A lost lease (another worker took the job over) stops the edit at the next step.
    If the work has not returned ``limits.job_timeout_s`` after the start, ``on_timeout`` runs
    on this thread (also after a lost lease: a stuck process must go whoever owns the job now).
    """

    def __init__(
        self,
        store: JobStore,
        job: Job,
        worker_id: str,
        limits: RunnerLimits,
        on_timeout: Callable[[_Lease], None],
    ) -> None:
        self._store, self.job, self._worker_id, self._limits = store, job, worker_id, limits
        self._on_timeout = on_timeout
        self._deadline = time.monotonic() + limits.job_timeout_s
        self._stop = threading.Event()
        self.lost = threading.Event()
        self.work_returned = threading.Event()  # set by the runner: nothing is stuck any more
        self._thread = threading.Thread(target=self._watch, name=f"lease-{job.id}", daemon=True)

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self._next_wake_s()):
            if time.monotonic() >= self._deadline:
                if not self.work_returned.is_set():
                    self._on_timeout(self)
                return
            if not self.lost.is_set():
                self._renew()

    def _next_wake_s(self) -> float:
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


class JobRunner:
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
        self.store, self.files, self.pipeline, self.fetcher = store, files, pipeline, fetcher
        # None: no image classifier, no prompt blocklist (has_nsfw_concepts all false)
        self.safety = safety or ContentSafety(SafetyPolicy(), None)
        self.worker_id = worker_id
        self.limits = limits or RunnerLimits()
        self.model_name = model_name
        self._exit_process = exit_process
        self.metrics = metrics
        self._last_edit: EditResult | None = None  # the current job's, for metrics
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="worker-io")
        self._progress_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-progress")
        self._drain = DrainDeadline()
        self._prefetch = _PrefetchCache(self.limits.prefetch_jobs)

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Claim and run jobs until ``stop`` is set (the job in hand is finished) or
        ``drain`` is called (the job in hand is finished or handed back)."""
        stop = stop or threading.Event()
        while not stop.is_set() and not self.draining:
            try:
                if not self.run_next():
                    # Returns as soon as work may be there (PostgreSQL NOTIFY, SQLite polling
                    # every few ms), so an idle worker starts a new job quickly.
                    self.store.wait_for_work(self.limits.idle_wait_s)
            except StoreError as exc:
                # The job store is unreachable (a PostgreSQL restart or failover): keep the
                # process and its loaded model, and try again. A job cut short by the outage
                # keeps its lease until it expires; then it is re-queued (fenced writes).
                log.warning("%s; the worker retries in %g s", exc, STORE_RETRY_S)
                stop.wait(STORE_RETRY_S)

    def run_next(self) -> bool:
        """Claim one job and run it; False when nothing was queued."""
        job = self.store.claim(self.worker_id, self.limits.lease_s)
        if job is None:
            self._prefetch.clear()  # nothing queued: whatever was fetched ahead is stale
            return False
        if self.draining:  # the drain began while this claim was on its way: give it back
            self.store.release(job.id, self.worker_id, job.attempts)
            return True
        self.run(job)
        return True

    def drain(self, timeout_s: float) -> None:
        """Stop claiming now. The job in hand may run ``timeout_s`` more; then it is
        interrupted at its next step and handed back to the queue (its place kept, the attempt
        not counted). Safe to call from a signal handler; a later call can only shorten the
        time."""
        self._drain.request(timeout_s)

    @property
    def draining(self) -> bool:
        return self._drain.active

    def close(self) -> None:
        self._prefetch.clear()
        self._io.shutdown(wait=True, cancel_futures=True)
        self._progress_io.shutdown(wait=True, cancel_futures=True)

    # --- one job ---------------------------------------------------------------------------
    def run(self, job: Job) -> None:
        """Run one claimed job to its end: finished (fenced), or handed back when a drain
        ran out of time. An execution timeout ends the process from the lease thread."""
        started = time.perf_counter()
        self._last_edit = None
        if self.metrics:
            self.metrics.job_started(job)
        with (
            request_context(job.id),
            _Lease(self.store, job, self.worker_id, self.limits, self._time_out) as lease,
        ):
            status, fields = self._execute(job, lease)
            lease.work_returned.set()
            if lease.lost.is_set():
                return  # another attempt owns the job now; our write would be refused anyway
            recorded = self._record(job, status, fields)
            if self.metrics and recorded and status is not JobStatus.QUEUED:
                run_s = time.perf_counter() - started
                error_type = fields.get("error_type")
                self.metrics.job_finished(job, status, error_type, run_s, self._last_edit)
        log.info(
            "job %s %s in %.3f s%s",
            job.id,
            "handed back" if status is JobStatus.QUEUED else status.value,
            time.perf_counter() - started,
            "" if recorded else " (not recorded: lease lost)",
        )

    def _record(self, job: Job, status: JobStatus, fields: dict[str, Any]) -> bool:
        if status is JobStatus.QUEUED:
            return self.store.release(job.id, self.worker_id, job.attempts)
        fields.setdefault("result", None)
        return self.store.finish(job.id, self.worker_id, job.attempts, status, **fields)

    def _time_out(self, lease: _Lease) -> None:
        """On the lease thread, when the run passed ``job_timeout_s``: fail the job, then end
        the process (the edit may be stuck where Python cannot interrupt it)."""
        job = lease.job
        message = (
            f"the edit ran longer than {self.limits.job_timeout_s:g} s; its worker was replaced"
        )
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

    def _should_stop(self, job: Job, lease: _Lease) -> bool:
        """Polled between denoising steps: lease lost, drain time up, or cancel requested."""
        return (
            lease.lost.is_set()
            or self._drain.time_is_up()
            or self.store.is_cancel_requested(job.id)
        )

    def _execute(self, job: Job, lease: _Lease) -> tuple[JobStatus, dict[str, Any]]:
        """The job's outcome: a final status with its fields, or ``QUEUED`` to hand it back."""
        progress = _ProgressWriter(self.store, job, self.worker_id, self._progress_io)
        try:
            request = self._build_request(job, lease)
            try:
                result = self.pipeline.edit(
                    request,
                    on_step=self._progress_reporter(progress),
                    should_cancel=lambda: self._should_stop(job, lease),
                )
            finally:  # the last step's event before the closing one
                progress.flush()
            result, nsfw_flags = self._screen_outputs(job, result)
            self._last_edit = result
            return JobStatus.SUCCEEDED, {"result": self._publish(job, request, result, nsfw_flags)}
        except EditCancelled:
            if self._drain.time_is_up() and not self.store.is_cancel_requested(job.id):
                return JobStatus.QUEUED, {}
            return JobStatus.CANCELED, {
                "error": CANCELLED_MESSAGE,
                "error_type": "client_cancelled",
            }
        except InputError as exc:
            self.store.add_event(job.id, str(exc), level="ERROR")
            return JobStatus.FAILED, {"error": str(exc), "error_type": exc.error_type}
        except Exception as exc:
            log.exception("job %s failed", job.id)
            message = f"internal error: {type(exc).__name__}: {exc}"
            self.store.add_event(job.id, message, level="ERROR")
            return JobStatus.FAILED, {"error": message, "error_type": "internal_error"}

    def _build_request(self, job: Job, lease: _Lease) -> EditRequest:
        data = job.input
        sources = _image_sources(data)
        fetched_ahead = self._prefetch.take(job)  # whatever happens next, the entry goes
        if self._should_stop(job, lease):
            raise EditCancelled(job.id)
        self.safety.check_prompt(data["prompt"], level_of(data))
        self.store.add_event(job.id, _loading_message(len(sources)))
        images = list(self._io.map(lambda source: self._image_for(source, fetched_ahead), sources))
        self._start_prefetch()  # this job has its inputs: fetch the next one's meanwhile
        self.safety.check_inputs(images, level_of(data))
        if data.get("enhance_prompt"):
            self.store.add_event(
                job.id,
                "enhance_prompt: no prompt upsampler is configured; the prompt is used as given",
                level="WARN",
            )
        acceleration = self._note_acceleration(job)
        if self.pipeline.random_weights:
            self.store.add_event(
                job.id,
                f"model {self.model_name or '(random)'} has random weights: outputs are noise",
                level="WARN",
            )
        aspect_ratio, match_input_size = _output_sizing(data)
        fmt: OutputFormat = "png" if data.get("output_format") == "png" else "jpeg"
        return EditRequest(
            prompt=data["prompt"],
            images=images,
            seed=data.get("seed"),
            guidance_scale=float(data.get("guidance_scale", 3.5)),
            num_images=int(data.get("num_images", 1)),
            aspect_ratio=aspect_ratio,
            num_inference_steps=data.get("num_inference_steps"),
            output_format=fmt,
            match_input_size=match_input_size,
            acceleration=acceleration,
        )

    def _note_acceleration(self, job: Job) -> RequestAcceleration | None:
        """fal [dev]'s ``acceleration``: what it changes on this worker, said in the job's
        logs (step caching per request; compile and fp8 are the worker's own settings)."""
        acceleration = job.input.get("acceleration")
        if acceleration not in ("none", "regular", "high"):
            return None
        note = getattr(self.pipeline, "describe_acceleration", None)
        if note is not None:
            message = note(acceleration)
        elif acceleration != "none":
            message = (
                f"acceleration {acceleration!r}: this engine has no acceleration settings; "
                "the edit runs at full quality"
            )
        else:
            message = None
        if message:
            self.store.add_event(job.id, message)
        return cast("RequestAcceleration", acceleration)

    def _image_for(self, source: str, fetched_ahead: dict[str, Future[Image.Image]]) -> Image.Image:
        """The image fetched ahead for this job, else (not fetched, failed, not started) a
        fetch now, which reports its errors as usual."""
        ahead = fetched_ahead.get(source)
        if ahead is not None and not ahead.cancel():  # running or done: its result is ours
            try:
                image = ahead.result()
            except Exception:  # logged by the prefetch; this fetch reports the error
                pass
            else:
                log.debug("reference image taken from the prefetch: %.80s", source)
                return image
        return self._load_image(source)

    # --- input prefetch ----------------------------------------------------------------------
    def _start_prefetch(self) -> None:
        """In the background: fetch the inputs of the job(s) queued next. Never waits."""
        if self.limits.prefetch_jobs <= 0 or self.draining:
            return
        generation = self._prefetch.generation
        with contextlib.suppress(RuntimeError):  # the runner is closing: nothing to fetch
            self._io.submit(self._prefetch_next, generation)

    def _prefetch_next(self, generation: int) -> None:
        if self.draining:
            return
        try:  # a hint only: whatever fails here, the claims and fetches go on as usual
            upcoming = self.store.peek_queued(self.limits.prefetch_jobs)
            self._prefetch.plan(upcoming, generation, self._submit_prefetch)
        except Exception as exc:
            log.debug("input prefetch: %s", exc)

    def _submit_prefetch(self, job_id: str, source: str) -> Future[Image.Image]:
        return self._io.submit(self._prefetch_image, job_id, source)

    def _prefetch_image(self, job_id: str, source: str) -> Image.Image:
        if self.draining:
            raise _PrefetchSkipped("draining")
        try:
            return self._load_image(source)
        except Exception as exc:
            log.debug("input prefetch of %s failed: %s", job_id, exc)
            raise

    def _load_image(self, source: str) -> Image.Image:
        # This server's own files (uploads, earlier outputs) are read from the file store:
        # no HTTP round trip, and no loopback fetch for the SSRF guard to refuse.
        raw = read_own_file(source, self.files, max_bytes=self.limits.max_image_bytes)
        if raw is None:
            raw = load_image_bytes(source, self.fetcher, max_bytes=self.limits.max_image_bytes)
        return imaging.decode_image(raw, max_pixels=self.limits.max_image_pixels)

    def _progress_reporter(self, writer: _ProgressWriter) -> Callable[[int, int], None]:
        last_write = 0.0

        def report(step: int, total: int) -> None:
            nonlocal last_write
            now = time.monotonic()
            if step < total and now - last_write < self.limits.progress_interval_s:
                return
            last_write = now
            writer.report(Progress(step, total))

        return report

    def _screen_outputs(self, job: Job, result: EditResult) -> tuple[EditResult, list[bool]]:
        """Flagged outputs become black images of the same size (content policy)."""
        screened, flags = self.safety.screen_outputs(result, level_of(job.input))
        for index in (i for i, flagged in enumerate(flags) if flagged):
            self.store.add_event(
                job.id,
                f"output image {index + 1} was replaced by a black image (content policy)",
                level="WARN",
            )
        return screened, flags

    def _publish(
        self, job: Job, request: EditRequest, result: EditResult, nsfw_flags: list[bool]
    ) -> dict[str, Any]:
        """Store the images (or inline them for sync_mode) and build ``Job.result``."""
        inline = bool(job.input.get("sync_mode"))
        images = [
            self._publish_image(job, index, image, inline)
            for index, image in enumerate(result.images)
        ]
        return {
            "images": images,
            "timings": result.timings,
            "seed": result.seed,
            "has_nsfw_concepts": nsfw_flags,
            "prompt": request.prompt,
            "random_weights": result.random_weights,
        }

    def _publish_image(
        self, job: Job, index: int, image: EncodedImage, inline: bool
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "width": image.width,
            "height": image.height,
            "content_type": image.content_type,
            "file_size": len(image.data),
        }
        if inline:
            encoded = base64.b64encode(image.data).decode("ascii")
            name = f"{job.id}-{index}.{image.extension}"
            entry |= {"file_key": None, "url": f"data:{image.content_type};base64,{encoded}"}
        else:
            key = new_file_key(job.id, job.attempts, index, image.extension)
            self.files.put(key, image.data, image.content_type)
            name = key.rsplit("/", 1)[-1]
            entry |= {"file_key": key, "url": None}
        entry["file_name"] = name
        return entry


class _PrefetchSkipped(Exception):
    """A prefetch that did not run (drain began); the claimed job fetches for itself."""


class _PrefetchCache:
    """Images of queued jobs, fetched ahead: job id -> {source: future image}, for at most
    ``max_jobs`` jobs, each with its place in the queue (priority, seq). Thread-safe.

    ``take`` (at claim) hands a job its entries and drops those of jobs ahead of it in the
    queue (another worker took them, or they were canceled). ``plan`` (after a peek) keeps
    the entries of jobs still queued next, drops the others and starts the missing fetches,
    unless this worker claimed since the peek (``generation``): then the list is stale.
    """

    def __init__(self, max_jobs: int) -> None:
        self._max_jobs = max(0, max_jobs)
        self._lock = threading.Lock()
        self._jobs: dict[str, tuple[tuple[int, int], dict[str, Future[Image.Image]]]] = {}
        self.generation = 0  # bumped by every take and clear

    def take(self, job: Job) -> dict[str, Future[Image.Image]]:
        place = (job.priority, job.seq)
        with self._lock:
            self.generation += 1
            _, mine = self._jobs.pop(job.id, ((0, 0), {}))
            ahead = [job_id for job_id, (at, _) in self._jobs.items() if at < place]
            stale = [self._jobs.pop(job_id)[1] for job_id in ahead]
        _cancel(stale)
        return mine

    def plan(
        self,
        upcoming: list[Job],
        generation: int,
        start: Callable[[str, str], Future[Image.Image]],
    ) -> None:
        with self._lock:
            if generation != self.generation:
                return  # this worker claimed since the peek: the list is out of date
            wanted = upcoming[: self._max_jobs]
            kept = {job.id: self._jobs.get(job.id, ((0, 0), {}))[1] for job in wanted}
            stale = [images for job_id, (_, images) in self._jobs.items() if job_id not in kept]
            for job in wanted:
                images = kept[job.id]
                for source in _image_sources(job.input):
                    if source not in images:
                        images[source] = start(job.id, source)
            self._jobs = {job.id: ((job.priority, job.seq), kept[job.id]) for job in wanted}
        _cancel(stale)

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            stale = [images for _, images in self._jobs.values()]
            self._jobs = {}
        _cancel(stale)

    def job_ids(self) -> list[str]:
        """The jobs with images fetched (or being fetched) ahead, in queue order."""
        with self._lock:
            return list(self._jobs)


def _cancel(dropped: list[dict[str, Future[Image.Image]]]) -> None:
    """Unstarted fetches of dropped entries are cancelled; running ones finish, forgotten."""
    for images in dropped:
        for future in images.values():
            future.cancel()


def _image_sources(job_input: dict[str, Any]) -> list[str]:
    """The reference images of a stored input: ``image_urls``, ``image_url``, or none
    (text-to-image endpoints)."""
    if "image_urls" in job_input:
        return list(job_input["image_urls"])
    if "image_url" in job_input:
        return [job_input["image_url"]]
    return []


def _loading_message(count: int) -> str:
    if count == 0:
        return "text-to-image: no reference image"
    return f"loading {count} reference image(s)"


def _output_sizing(job_input: dict[str, Any]) -> tuple[str | None, bool]:
    """``(aspect_ratio, match_input_size)`` for the engine. fal [dev]'s ``resolution_mode``:
    "auto" is the bucket nearest the input (no aspect ratio), "match_input" the input's own
    size, a ratio is that ratio at ~1 MP. Other endpoints carry ``aspect_ratio`` as is."""
    mode = job_input.get("resolution_mode")
    if mode is None:
        return job_input.get("aspect_ratio"), False
    if mode == "match_input":
        return None, True
    if mode == "auto":
        return None, False
    return str(mode), False
