"""Black Forest Labs' words for a job: statuses, the ``result`` object and BFL's webhook.

Shared by ``GET /v1/get_result`` (``http/bfl/routes.py``) and the webhook dispatcher, which
sends a BFL-shaped body for jobs submitted through ``POST /v1/flux-kontext-*``
(``http/webhooks.py`` picks it for them).

A job submitted through the BFL API carries ``Job.api == BFL_API`` and ``Job.api_data ==
{"webhook_secret": str | None}``. Only the BFL route sets them; no answer renders them, so the
secret does not leave the server. The webhook body is (BFL's documented format)::

    {"id": ..., "status": "Ready", "result": {"sample": <url>, "prompt": ..., "seed": ...},
     "timestamp": "2025-01-15T10:30:00Z"}
    {"id": ..., "status": "Error", "error": <error_type>, "message": ..., "timestamp": ...}

(``Request Moderated`` / ``Content Moderated`` instead of ``Error`` when the content check
refused the request or flagged the output.)

and with a ``webhook_secret`` it carries ``X-BFL-Signature: sha256=<hex HMAC-SHA256 of the
exact body bytes, keyed with the secret's UTF-8 bytes>``.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any

from kontext_server.domain.jobs import Job, JobStatus
from kontext_server.files.base import FileStore
from kontext_server.http.fal.results import render_output

__all__ = [
    "BFL_API",
    "BFL_SIGNATURE_HEADER",
    "CONTENT_MODERATED",
    "READY",
    "REQUEST_MODERATED",
    "TASK_NOT_FOUND",
    "bfl_progress",
    "bfl_result",
    "bfl_status",
    "is_bfl_job",
    "sign",
    "signature_headers",
    "webhook_body",
    "webhook_payload",
]

BFL_API = "bfl"  # Job.api of the jobs submitted through this skin
BFL_SIGNATURE_HEADER = "X-BFL-Signature"
PENDING = "Pending"
READY = "Ready"
ERROR = "Error"
REQUEST_MODERATED = "Request Moderated"
CONTENT_MODERATED = "Content Moderated"
TASK_NOT_FOUND = "Task not found"
# the worker's error type for a blocked prompt or a flagged input image (safety_policy.py)
_CONTENT_POLICY_ERROR_TYPE = "content_policy_violation"


def is_bfl_job(job: Job) -> bool:
    """Whether ``job`` was submitted through the BFL API (its webhook speaks BFL)."""
    return job.api == BFL_API


def bfl_status(job: Job) -> str:
    """``Pending`` until final; then ``Ready``; ``Content Moderated`` when the content check
    flagged the output (it was replaced by a black image); ``Request Moderated`` when it
    refused the prompt or an input image; ``Error`` otherwise (a cancelled job too: BFL has no
    word for it)."""
    if not job.status.is_final:
        return PENDING
    if job.status is JobStatus.SUCCEEDED:
        return CONTENT_MODERATED if _output_flagged(job) else READY
    if job.error_type == _CONTENT_POLICY_ERROR_TYPE:
        return REQUEST_MODERATED
    return ERROR


def _output_flagged(job: Job) -> bool:
    try:
        output = job.output
    except ValueError:  # a result that is not an edit output: nothing says it was flagged
        return False
    flags = output.nsfw_flags if output is not None else ()
    return bool(flags) and all(flags)


def bfl_progress(job: Job) -> float | None:
    """0..1 while pending (from the worker's steps), 1.0 when done, ``None`` after an error."""
    if job.status is JobStatus.SUCCEEDED:
        return 1.0
    if job.status.is_final:
        return None
    if job.progress is None or job.progress.total <= 0:
        return 0.0
    return round(job.progress.step / job.progress.total, 3)


def bfl_result(job: Job, output: dict[str, Any]) -> dict[str, Any]:
    """BFL's ``result`` of a succeeded job from its rendered fal ``output`` (image URLs
    filled in): the first image is ``sample``; times are unix seconds."""
    images = output.get("images") or []
    result: dict[str, Any] = {
        "sample": images[0].get("url") if images else None,
        "prompt": output.get("prompt"),
        "seed": output.get("seed"),
        "start_time": job.started_at,
        "end_time": job.finished_at,
        "duration": _duration_s(job),
    }
    if len(images) > 1:
        result["samples"] = [image.get("url") for image in images]
    return result


def _duration_s(job: Job) -> float | None:
    if job.started_at is None or job.finished_at is None:
        return None
    return round(job.finished_at - job.started_at, 3)


def webhook_body(job: Job, output: dict[str, Any] | None, *, now_s: float) -> dict[str, Any]:
    """BFL's webhook body for a finished job; ``output`` is its rendered fal output
    (``None`` unless it succeeded)."""
    status = bfl_status(job)
    body: dict[str, Any] = {"id": job.id, "status": status}
    if status == READY and output is not None:
        body["result"] = bfl_result(job, output)
    elif status == CONTENT_MODERATED:
        body["error"] = "content_moderated"
        body["message"] = "The content check flagged the output image; no image is returned"
    else:
        body["status"] = status if status == REQUEST_MODERATED else ERROR
        body["error"] = job.error_type or "internal_error"
        body["message"] = job.error or f"Request ended with status {job.status}"
    body["timestamp"] = datetime.fromtimestamp(now_s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return body


def webhook_payload(job: Job, files: FileStore, *, now_s: float) -> dict[str, Any]:
    """BFL's webhook body of a finished job, its image URLs under where the submitter reached
    us."""
    output = None
    if job.status is JobStatus.SUCCEEDED:
        output = render_output(job, job.base_url or "", files)
    return webhook_body(job, output, now_s=now_s)


def sign(secret: str, body: bytes) -> str:
    """The ``X-BFL-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of ``body``."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def signature_headers(job: Job, body: bytes) -> dict[str, str]:
    """``X-BFL-Signature`` for a BFL job submitted with a ``webhook_secret``; else none."""
    secret = (job.api_data or {}).get("webhook_secret") if is_bfl_job(job) else None
    if not isinstance(secret, str) or not secret:
        return {}
    return {BFL_SIGNATURE_HEADER: sign(secret, body)}
