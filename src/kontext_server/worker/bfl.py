"""The BFL engine: jobs routed to Black Forest Labs' hosted FLUX.1 Kontext (docs/bfl-engine.md).

A worker kind with no GPU and no torch (``kontext-server worker --engine bfl``). It claims
only jobs whose ``engine`` is ``bfl`` and keeps up to ``bfl_max_in_flight`` of them in
flight, one thread each (the threads mostly sleep between polls). For one job it:

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
ran is paid for and discarded). One heartbeat thread renews every in-flight lease; a lost
lease abandons that attempt silently (another worker owns the job and resumes the tasks).

The API key goes only into the ``x-key`` header of requests to BFL's own hosts (the base
URL's host and its sibling regional hosts); it is never logged, stored or returned.
"""

from __future__ import annotations

import base64
import functools
import io
import logging
import os
import secrets
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, NoReturn, TypeVar

import httpx
from PIL import Image

from kontext_server.config import Settings
from kontext_server.domain.errors import ConfigError, EditCancelled, InputError, KontextError
from kontext_server.domain.jobs import Job, JobStatus, Progress
from kontext_server.files import open_file_store
from kontext_server.files.base import FileStore, new_file_key
from kontext_server.logs import request_context
from kontext_server.net.fetch import SafeFetcher, load_image_bytes
from kontext_server.store import open_configured_store
from kontext_server.store.base import JobStore
from kontext_server.worker import imaging
from kontext_server.worker.drain import DrainDeadline
from kontext_server.worker.runner import EXECUTION_TIMEOUT_ERROR_TYPE

__all__ = [
    "BFL_ENGINE",
    "BFL_MAX_REFERENCE_IMAGES",
    "BFL_MODELS",
    "CONTENT_POLICY_ERROR_TYPE",
    "BflClient",
    "BflLimits",
    "BflWorker",
    "bfl_request_body",
    "run_bfl_worker",
]

log = logging.getLogger(__name__)

BFL_ENGINE = "bfl"
BFL_MAX_REFERENCE_IMAGES = 4  # input_image .. input_image_4
CONTENT_POLICY_ERROR_TYPE = "content_policy_violation"  # fal's word for a moderated request
UPSTREAM_ERROR_TYPE = "internal_error"  # BFL failed: the caller's input was fine
CANCELLED_MESSAGE = "Request cancelled"

# Our endpoint id -> BFL's model path (POST {base}/v1/{model}).
BFL_MODELS: dict[str, str] = {
    "fal-ai/flux-pro/kontext/max": "flux-kontext-max",
    "fal-ai/flux-pro/kontext/max/multi": "flux-kontext-max",
    "fal-ai/flux-pro/kontext": "flux-kontext-pro",
    "fal-ai/flux-pro/kontext/multi": "flux-kontext-pro",
}

_MODERATED = ("Request Moderated", "Content Moderated")
_FORMATS_BFL_READS = ("JPEG", "PNG", "WEBP")
_DETAIL_MAX_CHARS = 300
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


# --- failures ----------------------------------------------------------------------------------


class UpstreamFailure(KontextError):
    """Ends a job as failed: ``error_type`` is fal's word; ``data`` goes into the last event."""

    def __init__(
        self,
        message: str,
        error_type: str = UPSTREAM_ERROR_TYPE,
        data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.data = data or {}


class _Retryable(Exception):
    """An upstream answer worth trying again (429, 5xx, network). ``retry_after_s``: BFL's."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class _Abandoned(Exception):
    """This attempt lost its lease: record nothing, another worker owns the job."""


class _HandBack(Exception):
    """Drain time is up: release the job (its upstream tasks stay recorded)."""


# --- the HTTP client ---------------------------------------------------------------------------


def _detail(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return text if len(text) <= _DETAIL_MAX_CHARS else text[: _DETAIL_MAX_CHARS - 3] + "..."


def _retry_after_s(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


class BflClient:
    """BFL's task API: ``submit`` (``POST /v1/{model}``) and ``poll`` (``GET polling_url``).

    Raises ``_Retryable`` for 429, 5xx and network errors, ``UpstreamFailure`` for answers
    that another try would not change (bad key, no credits, a rejected request). ``transport``
    exists for tests."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._key_hosts = _key_hosts(httpx.URL(self.base_url).host)
        self._http = httpx.Client(timeout=timeout_s, transport=transport, follow_redirects=False)

    def close(self) -> None:
        self._http.close()

    def submit(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """``{id, polling_url}`` of a new (paid) task."""
        answer = self._send("POST", f"{self.base_url}/v1/{model}", json=body)
        if not isinstance(answer.get("id"), str):
            raise UpstreamFailure(
                f"Black Forest Labs answered a submit without a task id: {answer}"
            )
        return answer

    def poll(self, polling_url: str) -> dict[str, Any]:
        """``{id, status, result, progress}``; a 404 reads as status ``Task not found``."""
        return self._send("GET", polling_url)

    def polling_url_for(self, task_id: str) -> str:
        return f"{self.base_url}/v1/get_result?id={task_id}"

    def _send(self, method: str, url: str, json: Any = None) -> dict[str, Any]:
        target = httpx.URL(url)
        if not _host_matches(target.host, self._key_hosts):
            # Never hand the key to a host that is not BFL's.
            raise UpstreamFailure(
                f"Black Forest Labs returned a polling URL on host {target.host!r}, which is not"
                f" the configured BFL host ({httpx.URL(self.base_url).host}) or one of its"
                " regional hosts; refusing to send the API key there"
            )
        headers = {"x-key": self._api_key, "accept": "application/json"}
        try:
            response = self._http.request(method, target, json=json, headers=headers)
        except httpx.TransportError as exc:
            raise _Retryable(f"network error talking to Black Forest Labs: {exc}") from exc
        return self._answer(response)

    @staticmethod
    def _answer(response: httpx.Response) -> dict[str, Any]:
        code = response.status_code
        if code == 429 or code >= 500:
            raise _Retryable(
                f"Black Forest Labs answered {code}: {_detail(response)}", _retry_after_s(response)
            )
        if code == 404:
            return {"status": "Task not found"}
        if code in (401, 403):
            raise UpstreamFailure(
                f"Black Forest Labs refused the API key ({code}); the operator must check"
                " KONTEXT_BFL_API_KEY"
            )
        if code == 402:
            raise UpstreamFailure(
                "Black Forest Labs refused the task: the account has no credits left (402)"
            )
        if code >= 400:
            raise UpstreamFailure(
                f"Black Forest Labs rejected the request ({code}): {_detail(response)}",
                "bad_request",
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise _Retryable(f"Black Forest Labs answered {code} with non-JSON") from exc
        if not isinstance(body, dict):
            raise _Retryable(f"Black Forest Labs answered {code} with {type(body).__name__}")
        return body


def _key_hosts(base_host: str) -> tuple[str, ...]:
    """The base URL's host, plus its parent domain for regional hosts (api.eu1.bfl.ai for
    api.bfl.ai). An IP address or a one-label host matches only itself."""
    labels = base_host.split(".")
    if len(labels) < 3 or base_host.replace(".", "").isdigit():
        return (base_host,)
    return (base_host, "." + ".".join(labels[-2:]))


def _host_matches(host: str, allowed: tuple[str, ...]) -> bool:
    return host == allowed[0] or any(host.endswith(suffix) for suffix in allowed[1:])


# --- the request ---------------------------------------------------------------------------------


def bfl_request_body(job_input: dict[str, Any], images: list[str], seed: int) -> dict[str, Any]:
    """BFL's request for one output image. ``images``: the reference images as base64 (or
    URLs), at most four. Not sent: ``guidance_scale``, ``num_inference_steps`` (BFL does not
    take them), ``sync_mode`` (ours), ``num_images`` (one task per image)."""
    body: dict[str, Any] = {
        "prompt": job_input["prompt"],
        "seed": seed,
        "output_format": job_input.get("output_format", "jpeg"),
        "safety_tolerance": int(job_input.get("safety_tolerance", 2)),
        "prompt_upsampling": bool(job_input.get("enhance_prompt", False)),
    }
    if job_input.get("aspect_ratio"):
        body["aspect_ratio"] = job_input["aspect_ratio"]
    for index, image in enumerate(images):
        body["input_image" if index == 0 else f"input_image_{index + 1}"] = image
    return body


def _sources(job_input: dict[str, Any]) -> list[str]:
    sources: list[str] = (
        job_input["image_urls"] if "image_urls" in job_input else [job_input["image_url"]]
    )
    if len(sources) > BFL_MAX_REFERENCE_IMAGES:
        raise InputError(
            f"this endpoint runs on Black Forest Labs' API, which takes at most"
            f" {BFL_MAX_REFERENCE_IMAGES} reference images; got {len(sources)}"
        )
    return sources


# --- the worker ----------------------------------------------------------------------------------


@dataclass
class _InFlight:
    job: Job
    lost: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class BflWorker:
    """Runs ``bfl`` jobs from ``store`` through ``client`` (see the module docstring).

    ``fetcher`` loads the reference images (data URIs and URLs, with the local engine's
    rules) and downloads BFL's samples. Thread-safe where it matters: ``drain`` may be
    called from a signal handler."""

    def __init__(
        self,
        store: JobStore,
        files: FileStore,
        client: BflClient,
        fetcher: SafeFetcher,
        *,
        worker_id: str,
        limits: BflLimits | None = None,
    ) -> None:
        self.store, self.files, self.client, self.fetcher = store, files, client, fetcher
        self.worker_id = worker_id
        self.limits = limits or BflLimits()
        self._in_flight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()
        self._slot_freed = threading.Event()
        self._drain = DrainDeadline()

    # --- the loop ------------------------------------------------------------------------------
    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Claim and run jobs until ``stop`` is set or ``drain`` is called; then wait for
        the jobs in flight (a drain hands them back when its time is up)."""
        stop = stop or threading.Event()
        beats_stop = threading.Event()
        beats = threading.Thread(
            target=self._heartbeat_loop, args=(beats_stop,), name="bfl-leases", daemon=True
        )
        beats.start()
        try:
            while not stop.is_set() and not self.draining:
                if not self._claim_one():
                    self._wait_for_slot_or_work()
            self._wait_for_in_flight()
        finally:
            beats_stop.set()
            beats.join()

    def _claim_one(self) -> bool:
        """Start one job if a slot is free and one is queued; False when nothing started."""
        if self.in_flight_count >= self.limits.max_in_flight:
            return False
        job = self.store.claim(self.worker_id, self.limits.lease_s, engine=BFL_ENGINE)
        if job is None:
            return False
        if self.draining:  # the drain began while this claim was on its way
            self.store.release(job.id, self.worker_id, job.attempts)
            return True
        self.start(job)
        return True

    def _wait_for_slot_or_work(self) -> None:
        if self.in_flight_count >= self.limits.max_in_flight:
            self._slot_freed.wait(self.limits.idle_wait_s)
            self._slot_freed.clear()
        else:
            self.store.wait_for_work(self.limits.idle_wait_s, engine=BFL_ENGINE)

    def _wait_for_in_flight(self) -> None:
        with self._lock:
            threads = [entry.thread for entry in self._in_flight.values() if entry.thread]
        for thread in threads:
            thread.join()

    @property
    def in_flight_count(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def start(self, job: Job) -> threading.Thread:
        """Run a claimed job on a thread of its own; returns the thread."""
        entry = _InFlight(job)
        entry.thread = threading.Thread(
            target=self._run_and_forget, args=(entry,), name=f"bfl-{job.id}", daemon=True
        )
        with self._lock:
            self._in_flight[job.id] = entry
        entry.thread.start()
        return entry.thread

    def _run_and_forget(self, entry: _InFlight) -> None:
        try:
            self.run(entry)
        finally:
            with self._lock:
                self._in_flight.pop(entry.job.id, None)
            self._slot_freed.set()

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.limits.heartbeat_s):
            with self._lock:
                entries = list(self._in_flight.values())
            for entry in entries:
                self._renew(entry)

    def _renew(self, entry: _InFlight) -> None:
        job = entry.job
        try:
            alive = self.store.heartbeat(job.id, self.worker_id, job.attempts, self.limits.lease_s)
        except Exception:  # a busy database must not end the heartbeats; retry next beat
            log.exception("heartbeat of %s failed", job.id)
            return
        if not alive and not entry.lost.is_set():
            log.warning("lease of %s lost; abandoning this attempt", job.id)
            entry.lost.set()

    def drain(self, timeout_s: float) -> None:
        """Stop claiming now; jobs in flight may run ``timeout_s`` more, then they are handed
        back (their upstream tasks recorded, so the next worker resumes them). Safe from a
        signal handler; a later call can only shorten the time."""
        self._drain.request(timeout_s)
        self._slot_freed.set()

    @property
    def draining(self) -> bool:
        return self._drain.active

    def drain_time_is_up(self) -> bool:
        return self._drain.time_is_up()

    # --- one job -----------------------------------------------------------------------------
    def run(self, entry: _InFlight) -> None:
        """Run one claimed job to its end (fenced finish), or hand it back on drain."""
        job = entry.job
        started = time.monotonic()
        with request_context(job.id):
            status, fields = self._outcome(entry, started)
            if status is None:
                log.info("job %s abandoned: its lease moved to another worker", job.id)
                return
            if status is JobStatus.QUEUED:
                recorded = self.store.release(job.id, self.worker_id, job.attempts)
            else:
                fields.setdefault("result", None)
                recorded = self.store.finish(job.id, self.worker_id, job.attempts, status, **fields)
            log.info(
                "job %s %s in %.3f s%s",
                job.id,
                "handed back" if status is JobStatus.QUEUED else status.value,
                time.monotonic() - started,
                "" if recorded else " (not recorded: lease lost)",
            )

    def _outcome(self, entry: _InFlight, started: float) -> tuple[JobStatus | None, dict[str, Any]]:
        job = entry.job
        attempt = _Attempt(self, entry, started + self.limits.job_timeout_s)
        try:
            return JobStatus.SUCCEEDED, {"result": attempt.execute()}
        except _Abandoned:
            return None, {}
        except _HandBack:
            return JobStatus.QUEUED, {}
        except EditCancelled:
            return JobStatus.CANCELED, {
                "error": CANCELLED_MESSAGE,
                "error_type": "client_cancelled",
            }
        except (InputError, UpstreamFailure) as exc:
            self.store.add_event(job.id, str(exc), level="ERROR", data=_failure_data(exc))
            return JobStatus.FAILED, {"error": str(exc), "error_type": exc.error_type}
        except Exception as exc:
            log.exception("job %s failed", job.id)
            message = f"internal error: {type(exc).__name__}: {exc}"
            self.store.add_event(job.id, message, level="ERROR")
            return JobStatus.FAILED, {"error": message, "error_type": "internal_error"}


def _failure_data(exc: Exception) -> dict[str, Any] | None:
    return exc.data if isinstance(exc, UpstreamFailure) and exc.data else None


class _Attempt:
    """One attempt at one job: submit what is not yet submitted, poll, download, publish."""

    def __init__(self, worker: BflWorker, entry: _InFlight, deadline: float) -> None:
        self.worker, self.entry, self.job = worker, entry, entry.job
        self.store, self.limits = worker.store, worker.limits
        self.deadline = deadline
        self._last_progress: Progress | None = None
        self._statuses: dict[int, str] = {}

    # --- the stages ----------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
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
        images = [self._publish(index, url) for index, url in enumerate(samples)]
        return {
            "images": images,
            "timings": {"inference": round(time.monotonic() - started, 3)},
            "seed": record["seed"],
            "has_nsfw_concepts": [False] * len(images),
            "prompt": self.job.input["prompt"],
            "random_weights": False,
        }

    def _upstream_record(self, model: str) -> dict[str, Any]:
        """What an earlier attempt recorded, or a fresh record (seed drawn now, once)."""
        if self.job.upstream and self.job.upstream.get("tasks") is not None:
            submitted = len(self.job.upstream["tasks"])
            self.store.add_event(
                self.job.id,
                f"resuming {submitted} Black Forest Labs task(s) an earlier attempt submitted",
            )
            return dict(self.job.upstream)
        seed = self.job.input.get("seed")
        return {
            "engine": BFL_ENGINE,
            "model": model,
            "seed": secrets.randbelow(_SEED_LIMIT) if seed is None else int(seed),
            "tasks": [],
        }

    def _submit_missing(self, record: dict[str, Any]) -> None:
        wanted = int(self.job.input.get("num_images", 1))
        tasks: list[dict[str, str]] = record["tasks"]
        if len(tasks) >= wanted:
            return
        self._check()
        images = self._reference_images()
        for index in range(len(tasks), wanted):
            body = bfl_request_body(self.job.input, images, record["seed"] + index)
            answer = self._with_retries(
                "submit", functools.partial(self.worker.client.submit, record["model"], body)
            )
            task_id = answer["id"]
            polling_url = answer.get("polling_url") or self.worker.client.polling_url_for(task_id)
            tasks.append({"id": task_id, "polling_url": polling_url})
            # Recorded before anything else can fail: a later attempt resumes this task.
            if not self.store.set_upstream(
                self.job.id, self.worker.worker_id, self.job.attempts, record
            ):
                raise _Abandoned
            self.store.add_event(
                self.job.id,
                f"submitted to Black Forest Labs ({record['model']}, image"
                f" {index + 1}/{wanted}, seed {record['seed'] + index})",
                data={"upstream_task": task_id},
            )

    def _reference_images(self) -> list[str]:
        sources = _sources(self.job.input)
        self.store.add_event(self.job.id, f"loading {len(sources)} reference image(s)")
        return [self._as_base64(source) for source in sources]

    def _as_base64(self, source: str) -> str:
        raw = load_image_bytes(source, self.worker.fetcher, max_bytes=self.limits.max_image_bytes)
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
        answer = self._with_retries("poll", lambda: self.worker.client.poll(task["polling_url"]))
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
                f"{_error_detail(answer)})"
            )
        if status == "Task not found":
            raise UpstreamFailure(
                f"Black Forest Labs no longer knows task {task['id']} (its results expire);"
                " it was not submitted again, so as not to pay twice"
            )
        return None, _progress_fraction(answer.get("progress"))

    def _moderated(self, index: int, status: str) -> NoReturn:
        flags = [False] * int(self.job.input.get("num_images", 1))
        if status == "Content Moderated":
            flags[index] = True
            reason = (
                "the generated image was flagged by its safety filter at safety_tolerance"
                f" {self.job.input.get('safety_tolerance', '2')} (6 is the most permissive)"
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
        if not self.store.set_progress(
            self.job.id, self.worker.worker_id, self.job.attempts, current
        ):
            raise _Abandoned

    def _publish(self, index: int, sample_url: str) -> dict[str, Any]:
        data = self._download(index, sample_url)
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height, fmt = image.width, image.height, (image.format or "JPEG")
        except (OSError, Image.DecompressionBombError) as exc:
            raise UpstreamFailure(
                f"the image Black Forest Labs returned for image {index + 1} is unreadable: {exc}"
            ) from exc
        extension = {"PNG": "png", "WEBP": "webp"}.get(fmt, "jpeg")
        content_type = f"image/{extension}"
        entry: dict[str, Any] = {
            "width": width,
            "height": height,
            "content_type": content_type,
            "file_size": len(data),
        }
        if self.job.input.get("sync_mode"):
            encoded = base64.b64encode(data).decode("ascii")
            entry |= {
                "file_key": None,
                "url": f"data:{content_type};base64,{encoded}",
                "file_name": f"{self.job.id}-{index}.{extension}",
            }
            return entry
        key = new_file_key(self.job.id, self.job.attempts, index, extension)
        self.worker.files.put(key, data, content_type)
        return entry | {"file_key": key, "url": None, "file_name": key.rsplit("/", 1)[-1]}

    def _download(self, index: int, sample_url: str) -> bytes:
        self._check()
        try:
            return self.worker.fetcher.fetch(
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
            except _Retryable as exc:
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
        if self.entry.lost.is_set():
            raise _Abandoned
        if self.store.is_cancel_requested(self.job.id):
            raise EditCancelled(self.job.id)
        if self.worker.drain_time_is_up():
            raise _HandBack
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
            self.entry.lost.wait(min(remaining_s, _CHECK_SLICE_S))


def _progress_fraction(value: Any) -> float:
    """BFL's ``progress`` (0..1, or a percentage, or null) as 0..0.99 (1 means ready)."""
    if not isinstance(value, int | float) or value != value:  # NaN
        return 0.0
    fraction = value / 100 if value > 1 else value
    return min(max(float(fraction), 0.0), 0.99)


def _error_detail(answer: dict[str, Any]) -> str:
    for key in ("details", "detail", "error", "result"):
        value = answer.get(key)
        if value:
            text = str(value)
            return ": " + (text if len(text) <= _DETAIL_MAX_CHARS else text[:297] + "...")
    return ""


# --- the process ---------------------------------------------------------------------------------


def run_bfl_worker(settings: Settings, worker_id: str | None = None) -> None:
    """``kontext-server worker --engine bfl``: run until SIGTERM/SIGINT, then drain."""
    from kontext_server.worker.main import make_fetcher

    if settings.bfl_api_key is None or not settings.bfl_api_key.get_secret_value():
        raise ConfigError(
            "the BFL engine needs an API key: set KONTEXT_BFL_API_KEY (from"
            " https://api.bfl.ai) before starting `kontext-server worker --engine bfl`"
        )
    routed = sorted(e for e, engine in settings.engines.items() if engine == BFL_ENGINE)
    worker_id = worker_id or f"{socket.gethostname()}/{os.getpid()}/bfl-{uuid.uuid4().hex[:8]}"
    store = open_configured_store(settings)
    files = open_file_store(settings.files_url(), settings)
    client = BflClient(
        settings.bfl_base_url,
        settings.bfl_api_key.get_secret_value(),
        timeout_s=settings.bfl_request_timeout_s,
    )
    worker = BflWorker(
        store,
        files,
        client,
        make_fetcher(settings),
        worker_id=worker_id,
        limits=BflLimits.from_settings(settings),
    )
    log.info(
        "BFL worker %s ready (%s, up to %d in flight; routed: %s)",
        worker_id,
        client.base_url,
        settings.bfl_max_in_flight,
        ", ".join(routed) or "no endpoint yet (set KONTEXT_ENGINES)",
    )
    try:
        _run_until_signalled(worker, drain_timeout_s=settings.drain_timeout_s)
    finally:
        client.close()
        store.close()
        log.info("BFL worker %s stopped", worker_id)


def _run_until_signalled(worker: BflWorker, *, drain_timeout_s: float) -> None:
    """As ``worker.main.run_until_signalled``: the first signal drains, a second hands the
    jobs in flight back at once."""
    signals_seen = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals_seen
        signals_seen += 1
        worker.drain(drain_timeout_s if signals_seen == 1 else 0.0)

    previous = {
        signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        worker.run_forever()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
