"""The worker loop: claim a job, run the edit, publish the images, finish with a fenced write.

This module is torch-free: the engine arrives as an ``EditPipeline``, so the loop is tested
with hand-written fake engines as well as with the real tiny diffusers pipeline.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from kontext_server import imaging
from kontext_server.editing import (
    EditPipeline,
    EditRequest,
    EditResult,
    EncodedImage,
    OutputFormat,
)
from kontext_server.errors import EditCancelled, InputError
from kontext_server.fetch import SafeFetcher, load_image_bytes
from kontext_server.files.base import FileStore, new_file_key
from kontext_server.jobs import Job, JobStatus, Progress
from kontext_server.store.base import JobStore

__all__ = ["JobRunner", "RunnerLimits"]

log = logging.getLogger(__name__)

CANCELLED_MESSAGE = "Request cancelled"


@dataclass(frozen=True, slots=True)
class RunnerLimits:
    lease_s: float = 20.0
    heartbeat_s: float = 2.0
    claim_poll_s: float = 0.02
    progress_interval_s: float = 0.1  # progress writes are throttled, the last step never is
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 40_000_000


class _Lease:
    """Keeps one job's lease alive from a thread of its own.

    The GPU work runs in the caller's thread; torch releases the GIL inside kernels and Python
    switches threads every few milliseconds, so a long denoising step cannot starve this
    heartbeat. A lost lease (another worker took the job over) stops the edit at the next step.
    """

    def __init__(self, store: JobStore, job: Job, worker_id: str, limits: RunnerLimits) -> None:
        self._store, self._job, self._worker_id, self._limits = store, job, worker_id, limits
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job.id}", daemon=True)

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self._limits.heartbeat_s):
            try:
                alive = self._store.heartbeat(
                    self._job.id, self._worker_id, self._job.attempts, self._limits.lease_s
                )
            except Exception:  # a busy database must not kill the heartbeat; retry next beat
                log.exception("heartbeat of %s failed", self._job.id)
                continue
            if not alive:
                log.warning("lease of %s lost; abandoning this attempt", self._job.id)
                self.lost.set()
                return


class JobRunner:
    """Runs jobs from ``store`` on ``pipeline``, one at a time (one request per GPU)."""

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
    ) -> None:
        self.store, self.files, self.pipeline, self.fetcher = store, files, pipeline, fetcher
        self.worker_id = worker_id
        self.limits = limits or RunnerLimits()
        self.model_name = model_name
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="worker-io")

    def run_forever(self, stop: threading.Event) -> None:
        """Claim and run jobs until ``stop`` is set; the running job is always finished."""
        while not stop.is_set():
            if not self.run_next():
                stop.wait(self.limits.claim_poll_s)

    def run_next(self) -> bool:
        """Claim one job and run it; False when nothing was queued."""
        job = self.store.claim(self.worker_id, self.limits.lease_s)
        if job is None:
            return False
        self.run(job)
        return True

    def close(self) -> None:
        self._io.shutdown(wait=True)

    # --- one job ---------------------------------------------------------------------------
    def run(self, job: Job) -> None:
        started = time.perf_counter()
        with _Lease(self.store, job, self.worker_id, self.limits) as lease:
            status, fields = self._execute(job, lease)
            if lease.lost.is_set():
                return  # another attempt owns the job now; our write would be refused anyway
            fields.setdefault("result", None)
            finished = self.store.finish(job.id, self.worker_id, job.attempts, status, **fields)
        log.info(
            "job %s %s in %.3f s%s",
            job.id,
            status.value,
            time.perf_counter() - started,
            "" if finished else " (not recorded: lease lost)",
        )

    def _execute(self, job: Job, lease: _Lease) -> tuple[JobStatus, dict[str, Any]]:
        try:
            request = self._build_request(job)
            result = self.pipeline.edit(
                request,
                on_step=self._progress_reporter(job),
                should_cancel=lambda: lease.lost.is_set() or self.store.is_cancel_requested(job.id),
            )
            return JobStatus.SUCCEEDED, {"result": self._publish(job, request, result)}
        except EditCancelled:
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

    def _build_request(self, job: Job) -> EditRequest:
        data = job.input
        sources: list[str] = data["image_urls"] if "image_urls" in data else [data["image_url"]]
        if self.store.is_cancel_requested(job.id):
            raise EditCancelled(job.id)
        self.store.add_event(job.id, f"loading {len(sources)} reference image(s)")
        images = list(self._io.map(self._load_image, sources))
        if data.get("enhance_prompt"):
            self.store.add_event(
                job.id,
                "enhance_prompt: no prompt upsampler is configured; the prompt is used as given",
                level="WARN",
            )
        if self.pipeline.random_weights:
            self.store.add_event(
                job.id,
                f"model {self.model_name or '(random)'} has random weights: outputs are noise",
                level="WARN",
            )
        fmt: OutputFormat = "png" if data.get("output_format") == "png" else "jpeg"
        return EditRequest(
            prompt=data["prompt"],
            images=images,
            seed=data.get("seed"),
            guidance_scale=float(data.get("guidance_scale", 3.5)),
            num_images=int(data.get("num_images", 1)),
            aspect_ratio=data.get("aspect_ratio"),
            num_inference_steps=data.get("num_inference_steps"),
            output_format=fmt,
        )

    def _load_image(self, source: str) -> Image.Image:
        raw = load_image_bytes(source, self.fetcher, max_bytes=self.limits.max_image_bytes)
        return imaging.decode_image(raw, max_pixels=self.limits.max_image_pixels)

    def _progress_reporter(self, job: Job) -> Callable[[int, int], None]:
        last_write = 0.0

        def report(step: int, total: int) -> None:
            nonlocal last_write
            now = time.monotonic()
            if step < total and now - last_write < self.limits.progress_interval_s:
                return
            last_write = now
            self.store.set_progress(job.id, self.worker_id, job.attempts, Progress(step, total))

        return report

    def _publish(self, job: Job, request: EditRequest, result: EditResult) -> dict[str, Any]:
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
            "has_nsfw_concepts": [False] * len(images),
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
