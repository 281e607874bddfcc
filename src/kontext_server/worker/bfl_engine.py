"""The BFL engine: jobs routed to Black Forest Labs' hosted FLUX.1 Kontext (docs/bfl-engine.md).

The engine of a worker kind with no GPU and no torch (``kontext-server worker --engine bfl``,
``worker.bfl``). It runs only jobs whose ``engine`` is ``bfl`` and keeps up to
``bfl_max_in_flight`` of them in flight, one thread each (the threads mostly sleep between
polls). For one job it:

1. records a seed (the caller's, or a drawn one) and, per output image, submits one upstream
   task (seeds ``seed``, ``seed + 1``, ...), storing each task id on the job (``set_upstream``,
   fenced) right after BFL answers: a later attempt (after a crash or a drain) resumes those
   tasks and submits only the missing ones, so a request is never paid for twice;
2. polls every task's ``polling_url`` with a growing pause, turning ``progress`` into
   progress events; ``Request Moderated`` / ``Content Moderated`` end the job with
   ``content_policy_violation``, ``Error`` and ``Task not found`` with a clear error;
3. downloads each sample (through the ``SafeFetcher``: BFL's delivery hosts are public)
   into our file store and finishes the job with the same result shape as the local engine.

Upstream 429 and 5xx answers (and network errors) are retried with backoff while the job's
time (``job_timeout_s`` from its start) lasts. Cancel stops polling at once (what BFL already
ran is paid for and discarded). A lost lease abandons that attempt silently (another worker
owns the job and resumes the tasks). The HTTP client is ``worker.bfl_client``.
"""

from __future__ import annotations

import base64
import functools
import io
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from PIL import Image

from kontext_server.config import Settings
from kontext_server.domain.editing import EditInput, EditOutput, EncodedImage, OutputImage
from kontext_server.domain.errors import EditCancelled, InputError
from kontext_server.domain.jobs import Progress
from kontext_server.files.base import FileStore
from kontext_server.net.fetch import SafeFetcher, load_image_bytes
from kontext_server.store.base import JobStore
from kontext_server.worker import imaging
from kontext_server.worker.bfl_client import BflClient, Retryable, UpstreamFailure, error_detail
from kontext_server.worker.engine import (
    EXECUTION_TIMEOUT_ERROR_TYPE,
    Abandoned,
    HandBack,
    JobContext,
    publish_image,
)
from kontext_server.worker.safety_policy import CONTENT_POLICY_ERROR_TYPE

__all__ = [
    "BFL_ENGINE",
    "BFL_MAX_REFERENCE_IMAGES",
    "BFL_MODELS",
    "CONTENT_POLICY_ERROR_TYPE",
    "BflEngine",
    "BflLimits",
    "bfl_request_body",
]

BFL_ENGINE = "bfl"
BFL_MAX_REFERENCE_IMAGES = 4  # input_image .. input_image_4

# Our endpoint id -> BFL's model path (POST {base}/v1/{model}).
BFL_MODELS: dict[str, str] = {
    "fal-ai/flux-pro/kontext/max": "flux-kontext-max",
    "fal-ai/flux-pro/kontext/max/multi": "flux-kontext-max",
    "fal-ai/flux-pro/kontext": "flux-kontext-pro",
    "fal-ai/flux-pro/kontext/multi": "flux-kontext-pro",
}

_MODERATED = ("Request Moderated", "Content Moderated")
_FORMATS_BFL_READS = ("JPEG", "PNG", "WEBP")
_CHECK_SLICE_S = 0.2  # longest sleep between looks at cancel / lease / drain while waiting
_SEED_LIMIT = 2**32  # drawn seeds; seed + i must stay within what BFL accepts

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BflLimits:
    lease_s: float = 30.0
    heartbeat_s: float = 5.0
    idle_wait_s: float = 0.5
    job_timeout_s: float = 900.0  # from this attempt's start; retries stop there
    max_in_flight: int = 8
    poll_initial_s: float = 0.5
    poll_max_s: float = 5.0
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 40_000_000

    @classmethod
    def from_settings(cls, settings: Settings) -> BflLimits:
        return cls(
            lease_s=settings.lease_s,
            heartbeat_s=settings.heartbeat_s,
            job_timeout_s=settings.job_timeout_s,
            max_in_flight=settings.bfl_max_in_flight,
            poll_initial_s=settings.bfl_poll_initial_s,
            poll_max_s=settings.bfl_poll_max_s,
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
        )


# --- the request --------------------------------------------------------------------------------


def bfl_request_body(edit: EditInput, images: list[str], seed: int) -> dict[str, Any]:
    """BFL's request for one output image of ``edit``. ``images``: the reference images as
    base64 (or URLs), at most four. Not sent: ``guidance_scale``, ``num_inference_steps`` (BFL
    does not take them), ``inline_output`` (ours), ``num_images`` (one task per image)."""
    body: dict[str, Any] = {
        "prompt": edit.prompt,
        "seed": seed,
        "output_format": edit.output_format,
        "safety_tolerance": edit.safety_tolerance,
        "prompt_upsampling": edit.enhance_prompt,
    }
    if edit.aspect_ratio:
        body["aspect_ratio"] = edit.aspect_ratio
    for index, image in enumerate(images):
        body["input_image" if index == 0 else f"input_image_{index + 1}"] = image
    return body


# --- the engine ----------------------------------------------------------------------------------


class BflEngine:
    """Runs claimed ``bfl`` jobs through ``client`` (see the module docstring), up to
    ``limits.max_in_flight`` at once. ``fetcher`` loads the reference images (data URIs and
    URLs, with the local engine's rules) and downloads BFL's samples."""

    name = BFL_ENGINE
    watchdog_s: float | None = None  # each attempt keeps its own time (job_timeout_s)

    def __init__(
        self,
        store: JobStore,
        files: FileStore,
        client: BflClient,
        fetcher: SafeFetcher,
        *,
        limits: BflLimits | None = None,
    ) -> None:
        self.store, self.files, self.client, self.fetcher = store, files, client, fetcher
        self.limits = limits or BflLimits()
        self.capacity = self.limits.max_in_flight

    def execute(self, ctx: JobContext) -> EditOutput:
        return _Attempt(self, ctx).execute()

    def idle(self) -> None:
        pass

    def close(self) -> None:
        pass  # the client is its creator's to close


class _Attempt:
    """One attempt at one job: submit what is not yet submitted, poll, download, publish."""

    def __init__(self, engine: BflEngine, ctx: JobContext) -> None:
        self.engine, self.ctx, self.job = engine, ctx, ctx.job
        self.store, self.limits = engine.store, engine.limits
        self.deadline = time.monotonic() + self.limits.job_timeout_s
        self.given = self.job.input
        self._last_progress: Progress | None = None
        self._statuses: dict[int, str] = {}

    # --- the stages ----------------------------------------------------------------------------
    def execute(self) -> EditOutput:
        started = time.monotonic()
        model = BFL_MODELS.get(self.job.endpoint)
        if model is None:
            raise UpstreamFailure(
                f"endpoint {self.job.endpoint} has no Black Forest Labs model; BFL serves"
                f" {', '.join(sorted(BFL_MODELS))}"
            )
        record = self._upstream_record(model)
        self._submit_missing(record)
        samples = self._poll_until_ready(record["tasks"])
        images = tuple(self._publish(index, url) for index, url in enumerate(samples))
        return EditOutput(
            images=images,
            seed=record["seed"],
            prompt=self.given.prompt,
            nsfw_flags=(False,) * len(images),
            timings={"inference": round(time.monotonic() - started, 3)},
        )

    def _upstream_record(self, model: str) -> dict[str, Any]:
        """What an earlier attempt recorded, or a fresh record (seed drawn now, once)."""
        if self.job.upstream and self.job.upstream.get("tasks") is not None:
            submitted = len(self.job.upstream["tasks"])
            self.store.add_event(
                self.job.id,
                f"resuming {submitted} Black Forest Labs task(s) an earlier attempt submitted",
            )
            return dict(self.job.upstream)
        seed = self.given.seed
        return {
            "engine": BFL_ENGINE,
            "model": model,
            "seed": secrets.randbelow(_SEED_LIMIT) if seed is None else seed,
            "tasks": [],
        }

    def _submit_missing(self, record: dict[str, Any]) -> None:
        wanted = self.given.num_images
        tasks: list[dict[str, str]] = record["tasks"]
        if len(tasks) >= wanted:
            return
        self._check()
        images = self._reference_images()
        for index in range(len(tasks), wanted):
            body = bfl_request_body(self.given, images, record["seed"] + index)
            answer = self._with_retries(
                "submit", functools.partial(self.engine.client.submit, record["model"], body)
            )
            task_id = answer["id"]
            polling_url = answer.get("polling_url") or self.engine.client.polling_url_for(task_id)
            tasks.append({"id": task_id, "polling_url": polling_url})
            # Recorded before anything else can fail: a later attempt resumes this task.
            if not self.store.set_upstream(
                self.job.id, self.ctx.worker_id, self.job.attempts, record
            ):
                raise Abandoned
            self.store.add_event(
                self.job.id,
                f"submitted to Black Forest Labs ({record['model']}, image"
                f" {index + 1}/{wanted}, seed {record['seed'] + index})",
                data={"upstream_task": task_id},
            )

    def _reference_images(self) -> list[str]:
        sources = _checked_count(self.given.references)
        self.store.add_event(self.job.id, f"loading {len(sources)} reference image(s)")
        return [self._as_base64(source) for source in sources]

    def _as_base64(self, source: str) -> str:
        raw = load_image_bytes(source, self.engine.fetcher, max_bytes=self.limits.max_image_bytes)
        image = imaging.decode_image(raw, max_pixels=self.limits.max_image_pixels)
        if image.format not in _FORMATS_BFL_READS:  # gif, avif, bmp...: send a PNG instead
            buffer = io.BytesIO()
            imaging.to_rgb(image).save(buffer, format="PNG")
            raw = buffer.getvalue()
        return base64.b64encode(raw).decode("ascii")

    def _poll_until_ready(self, tasks: list[dict[str, str]]) -> list[str]:
        samples: list[str | None] = [None] * len(tasks)
        progress: list[float] = [0.0] * len(tasks)
        pause_s = self.limits.poll_initial_s
        while True:
            for index, task in enumerate(tasks):
                if samples[index] is None:
                    samples[index], progress[index] = self._poll_once(index, task)
            self._report_progress(progress)
            if all(sample is not None for sample in samples):
                return [sample for sample in samples if sample is not None]
            self._pause(pause_s)
            pause_s = min(pause_s * 1.5, self.limits.poll_max_s)

    def _poll_once(self, index: int, task: dict[str, str]) -> tuple[str | None, float]:
        """``(sample URL, 1.0)`` when ready, else ``(None, progress 0..1)``; raises for the
        statuses that end the job."""
        answer = self._with_retries("poll", lambda: self.engine.client.poll(task["polling_url"]))
        status = str(answer.get("status"))
        if self._statuses.get(index) != status:
            self._statuses[index] = status
            self.store.add_event(self.job.id, f"Black Forest Labs task {index + 1}: {status}")
        if status == "Ready":
            result = answer.get("result")
            sample = result.get("sample") if isinstance(result, dict) else None
            if not isinstance(sample, str):
                raise UpstreamFailure(
                    f"Black Forest Labs reported task {task['id']} Ready without a sample URL"
                )
            return sample, 1.0
        if status in _MODERATED:
            self._moderated(index, status)
        if status == "Error":
            raise UpstreamFailure(
                f"Black Forest Labs could not run the edit (task {task['id']}: Error"
                f"{error_detail(answer)})"
            )
        if status == "Task not found":
            raise UpstreamFailure(
                f"Black Forest Labs no longer knows task {task['id']} (its results expire);"
                " it was not submitted again, so as not to pay twice"
            )
        return None, _progress_fraction(answer.get("progress"))

    def _moderated(self, index: int, status: str) -> NoReturn:
        flags = [False] * self.given.num_images
        if status == "Content Moderated":
            flags[index] = True
            reason = (
                "the generated image was flagged by its safety filter at safety_tolerance"
                f" {self.given.safety_tolerance} (6 is the most permissive)"
            )
        else:
            reason = "the prompt or an input image was flagged by its safety filter"
        raise UpstreamFailure(
            f"Black Forest Labs moderated this request ({status}): {reason}; no image is returned",
            CONTENT_POLICY_ERROR_TYPE,
            {"has_nsfw_concepts": flags, "upstream_status": status},
        )

    def _report_progress(self, progress: list[float]) -> None:
        percent = round(100 * sum(progress) / len(progress))
        current = Progress(step=percent, total=100)
        if current == self._last_progress:
            return
        self._last_progress = current
        if not self.store.set_progress(self.job.id, self.ctx.worker_id, self.job.attempts, current):
            raise Abandoned

    def _publish(self, index: int, sample_url: str) -> OutputImage:
        data = self._download(index, sample_url)
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height, fmt = image.width, image.height, (image.format or "JPEG")
        except (OSError, Image.DecompressionBombError) as exc:
            raise UpstreamFailure(
                f"the image Black Forest Labs returned for image {index + 1} is unreadable: {exc}"
            ) from exc
        extension = {"PNG": "png", "WEBP": "webp"}.get(fmt, "jpeg")
        sample = EncodedImage(data, width, height, f"image/{extension}")
        return publish_image(
            self.engine.files, self.job, index, sample, extension, inline=self.given.inline_output
        )

    def _download(self, index: int, sample_url: str) -> bytes:
        self._check()
        try:
            return self.engine.fetcher.fetch(
                sample_url, max_bytes=self.limits.max_image_bytes, label="BFL sample URL"
            )
        except InputError as exc:
            raise UpstreamFailure(
                f"the result of image {index + 1} could not be downloaded from Black Forest"
                f" Labs (its sample URLs expire about 10 minutes after the task is ready): {exc}"
            ) from exc

    # --- waiting, retrying, stopping -----------------------------------------------------------
    def _with_retries(self, what: str, call: Callable[[], T]) -> T:
        pause_s = self.limits.poll_initial_s
        while True:
            self._check()
            try:
                return call()
            except Retryable as exc:
                wait_s = max(pause_s, exc.retry_after_s or 0.0)
                if time.monotonic() + wait_s >= self.deadline:
                    raise UpstreamFailure(
                        f"Black Forest Labs kept failing ({exc}) until this request's time"
                        f" ({self.limits.job_timeout_s:g} s) ran out",
                        EXECUTION_TIMEOUT_ERROR_TYPE,
                    ) from exc
                self.store.add_event(
                    self.job.id, f"BFL {what}: {exc}; retrying in {wait_s:.1f} s", level="WARN"
                )
                self._pause(wait_s)
                pause_s = min(pause_s * 2, self.limits.poll_max_s)

    def _check(self) -> None:
        """Raises when this attempt must stop: lease lost, cancel, drain over, time up."""
        if self.ctx.lease_lost.is_set():
            raise Abandoned
        if self.store.is_cancel_requested(self.job.id):
            raise EditCancelled(self.job.id)
        if self.ctx.drain.time_is_up():
            raise HandBack
        if time.monotonic() >= self.deadline:
            raise UpstreamFailure(
                f"Black Forest Labs did not finish within {self.limits.job_timeout_s:g} s",
                EXECUTION_TIMEOUT_ERROR_TYPE,
            )

    def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, looking at cancel, lease and drain every ``_CHECK_SLICE_S``."""
        until = time.monotonic() + seconds
        while True:
            self._check()
            remaining_s = until - time.monotonic()
            if remaining_s <= 0:
                return
            self.ctx.lease_lost.wait(min(remaining_s, _CHECK_SLICE_S))


def _progress_fraction(value: Any) -> float:
    """BFL's ``progress`` (0..1, or a percentage, or null) as 0..0.99 (1 means ready)."""
    if not isinstance(value, int | float) or value != value:  # NaN
        return 0.0
    fraction = value / 100 if value > 1 else value
    return min(max(float(fraction), 0.0), 0.99)


def _checked_count(sources: Sequence[str]) -> Sequence[str]:
    if len(sources) > BFL_MAX_REFERENCE_IMAGES:
        raise InputError(
            f"this endpoint runs on Black Forest Labs' API, which takes at most"
            f" {BFL_MAX_REFERENCE_IMAGES} reference images; got {len(sources)}"
        )
    return sources
