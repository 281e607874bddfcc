"""The local engine: a claimed job's edit on this machine's diffusers pipeline.

For one job it reads the stored input (``read_local_input``), checks the prompt, fetches and
decodes the reference images (``SafeFetcher``, or this server's own files from the file
store), runs the edit with throttled progress writes and a stop check between denoising
steps, screens the outputs, and publishes the images (file store, or inline for
``inline_output``). One job at a time, in the worker loop's thread (``worker.loop``).

**Input prefetch** (``RunnerLimits.prefetch_jobs``): once the job in hand has its own
reference images, the engine looks at the next queued job(s) (``JobStore.peek_queued``) and
fetches and decodes their images on its I/O threads while the edit runs, with the same rules
and limits. When this worker claims such a job, it takes the images from that small cache
instead of fetching again; entries of jobs that another worker took, or that were canceled,
are dropped. A prefetch failure is only logged (debug): the claimed job fetches as usual and
reports the error. Prompt and input checks run on the claimed job as always.

This module is torch-free: the pipeline arrives as an ``EditPipeline``, so the engine is
tested with hand-written fake pipelines as well as with the real tiny diffusers pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from kontext_server.core.uploads import read_own_file
from kontext_server.domain.editing import (
    EditInput,
    EditOutput,
    EditPipeline,
    EditRequest,
    EditResult,
    RequestAcceleration,
)
from kontext_server.domain.errors import EditCancelled
from kontext_server.domain.jobs import Job, Progress
from kontext_server.files.base import FileStore
from kontext_server.net.fetch import SafeFetcher, load_image_bytes
from kontext_server.store.base import JobStore
from kontext_server.worker import imaging
from kontext_server.worker.drain import DrainDeadline
from kontext_server.worker.engine import HandBack, JobContext, publish_image
from kontext_server.worker.safety_policy import ContentSafety, SafetyPolicy

__all__ = ["LOCAL_ENGINE", "LocalEngine", "RunnerLimits"]

log = logging.getLogger(__name__)

LOCAL_ENGINE = "local"


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


# --- progress --------------------------------------------------------------------------------


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


# --- the engine ------------------------------------------------------------------------------


class LocalEngine:
    """Runs claimed jobs on ``pipeline``, one at a time (one request per GPU)."""

    name = LOCAL_ENGINE
    capacity = 1

    def __init__(
        self,
        store: JobStore,
        files: FileStore,
        pipeline: EditPipeline,
        fetcher: SafeFetcher,
        *,
        limits: RunnerLimits | None = None,
        model_name: str = "",
        safety: ContentSafety | None = None,
    ) -> None:
        self.store, self.files, self.pipeline, self.fetcher = store, files, pipeline, fetcher
        # None: no image classifier, no prompt blocklist (has_nsfw_concepts all false)
        self.safety = safety or ContentSafety(SafetyPolicy(), None)
        self.limits = limits or RunnerLimits()
        self.watchdog_s: float | None = self.limits.job_timeout_s
        self.model_name = model_name
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="worker-io")
        self._progress_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-progress")
        self._prefetch = _PrefetchCache(self.limits.prefetch_jobs)

    def idle(self) -> None:
        self._prefetch.clear()  # nothing queued: whatever was fetched ahead is stale

    def close(self) -> None:
        self._prefetch.clear()
        self._io.shutdown(wait=True, cancel_futures=True)
        self._progress_io.shutdown(wait=True, cancel_futures=True)

    def execute(self, ctx: JobContext) -> EditOutput:
        """``Job.result`` of the edit; a stop that is the drain's (not a cancel) hands the
        job back."""
        try:
            return self._edit(ctx)
        except EditCancelled:
            if ctx.drain.time_is_up() and not self.store.is_cancel_requested(ctx.job.id):
                raise HandBack from None
            raise

    def _edit(self, ctx: JobContext) -> EditOutput:
        job = ctx.job
        progress = _ProgressWriter(self.store, job, ctx.worker_id, self._progress_io)
        fetched_ahead = self._prefetch.take(job)  # whatever happens next, the entry goes
        given = job.input
        request = self._build_request(ctx, given, fetched_ahead)
        try:
            result = self.pipeline.edit(
                request,
                on_step=self._progress_reporter(progress),
                should_cancel=lambda: self._should_stop(ctx),
            )
        finally:  # the last step's event before the closing one
            progress.flush()
        result, nsfw_flags = self._screen_outputs(job, result, given.safety_tolerance)
        ctx.edit = result
        return self._publish(job, request, result, nsfw_flags, given.inline_output)

    def _should_stop(self, ctx: JobContext) -> bool:
        """Polled between denoising steps: lease lost, drain time up, or cancel requested."""
        return (
            ctx.lease_lost.is_set()
            or ctx.drain.time_is_up()
            or self.store.is_cancel_requested(ctx.job.id)
        )

    def _build_request(
        self,
        ctx: JobContext,
        given: EditInput,
        fetched_ahead: dict[str, Future[Image.Image]],
    ) -> EditRequest:
        job = ctx.job
        if self._should_stop(ctx):
            raise EditCancelled(job.id)
        self.safety.check_prompt(given.prompt, given.safety_tolerance)
        self.store.add_event(job.id, _loading_message(len(given.references)))
        images = list(
            self._io.map(lambda source: self._image_for(source, fetched_ahead), given.references)
        )
        self._start_prefetch(ctx.drain)  # this job has its inputs: fetch the next one's meanwhile
        self.safety.check_inputs(images, given.safety_tolerance)
        if given.enhance_prompt:
            self.store.add_event(
                job.id,
                "enhance_prompt: no prompt upsampler is configured; the prompt is used as given",
                level="WARN",
            )
        self._note_acceleration(job, given.acceleration)
        if self.pipeline.random_weights:
            self.store.add_event(
                job.id,
                f"model {self.model_name or '(random)'} has random weights: outputs are noise",
                level="WARN",
            )
        return EditRequest.of(given, images)

    def _note_acceleration(self, job: Job, acceleration: RequestAcceleration | None) -> None:
        """fal [dev]'s ``acceleration``: what it changes on this worker, said in the job's
        logs (step caching per request; compile and fp8 are the worker's own settings)."""
        if acceleration is None:
            return
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
    def _start_prefetch(self, drain: DrainDeadline) -> None:
        """In the background: fetch the inputs of the job(s) queued next. Never waits."""
        if self.limits.prefetch_jobs <= 0 or drain.active:
            return
        generation = self._prefetch.generation
        with contextlib.suppress(RuntimeError):  # the engine is closing: nothing to fetch
            self._io.submit(self._prefetch_next, generation, drain)

    def _prefetch_next(self, generation: int, drain: DrainDeadline) -> None:
        if drain.active:
            return
        try:  # a hint only: whatever fails here, the claims and fetches go on as usual
            upcoming = self.store.peek_queued(self.limits.prefetch_jobs)
            self._prefetch.plan(
                upcoming,
                generation,
                lambda job_id, source: self._io.submit(self._prefetch_image, job_id, source, drain),
            )
        except Exception as exc:
            log.debug("input prefetch: %s", exc)

    def _prefetch_image(self, job_id: str, source: str, drain: DrainDeadline) -> Image.Image:
        if drain.active:
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

    # --- the result ----------------------------------------------------------------------------
    def _screen_outputs(
        self, job: Job, result: EditResult, safety_level: int
    ) -> tuple[EditResult, list[bool]]:
        """Flagged outputs become black images of the same size (content policy)."""
        screened, flags = self.safety.screen_outputs(result, safety_level)
        for index in (i for i, flagged in enumerate(flags) if flagged):
            self.store.add_event(
                job.id,
                f"output image {index + 1} was replaced by a black image (content policy)",
                level="WARN",
            )
        return screened, flags

    def _publish(
        self,
        job: Job,
        request: EditRequest,
        result: EditResult,
        nsfw_flags: list[bool],
        inline: bool,
    ) -> EditOutput:
        """Store the images (or inline them) and say what was published."""
        images = tuple(
            publish_image(self.files, job, index, image, image.extension, inline=inline)
            for index, image in enumerate(result.images)
        )
        return EditOutput(
            images=images,
            seed=result.seed,
            prompt=request.prompt,
            nsfw_flags=tuple(nsfw_flags),
            timings=result.timings,
            random_weights=result.random_weights,
        )


# --- input prefetch ----------------------------------------------------------------------------


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
                for source in job.input.references:
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


def _loading_message(count: int) -> str:
    if count == 0:
        return "text-to-image: no reference image"
    return f"loading {count} reference image(s)"
