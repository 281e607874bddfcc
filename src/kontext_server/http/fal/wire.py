"""fal's wire forms of a job (PROTOCOL.md §3-§7): statuses, URLs, logs, error codes.

The core speaks ``JobStatus`` (queued, running, succeeded, failed, canceled); fal clients know
only ``IN_QUEUE``, ``IN_PROGRESS`` and ``COMPLETED``, so a failure or a cancellation reads
``COMPLETED`` plus ``error`` and ``error_type``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kontext_server.domain.jobs import Job, JobEvent, JobStatus

__all__ = [
    "CANCELLED_STATUS_CODE",
    "ERROR_STATUS_CODES",
    "REQUEST_ID_HEADER",
    "RequestUrls",
    "app_path",
    "endpoint_matches",
    "error_body",
    "error_status_code",
    "fal_status",
    "log_entry",
    "status_body",
    "submit_body",
]

REQUEST_ID_HEADER = "x-fal-request-id"

# Result of a cancelled request: the client asked for it, so a 4xx; 400 like cancel's
# ALREADY_COMPLETED, told apart by X-Fal-Error-Type: client_cancelled (ours).
CANCELLED_STATUS_CODE = 400
ERROR_STATUS_CODES = {
    "bad_request": 422,
    "file_download_error": 422,
    "image_load_error": 422,
    "content_policy_violation": 422,  # an upstream engine's safety filter (docs/bfl-engine.md)
    "request_timeout": 504,
    "internal_error": 500,
    # not 503: clients retry a 503, and a retried `run` would pay for the edit again
    "runner_disconnected": 500,
    "client_cancelled": CANCELLED_STATUS_CODE,
}


@dataclass(frozen=True, slots=True)
class RequestUrls:
    """The three URLs of a request, under the queue base the client used."""

    response_url: str
    status_url: str
    cancel_url: str

    @classmethod
    def build(cls, queue_base: str, endpoint: str, request_id: str) -> RequestUrls:
        response_url = f"{queue_base}/{app_path(endpoint)}/requests/{request_id}"
        return cls(response_url, f"{response_url}/status", f"{response_url}/cancel")

    def as_dict(self) -> dict[str, str]:
        return {
            "response_url": self.response_url,
            "status_url": self.status_url,
            "cancel_url": self.cancel_url,
        }


def app_path(endpoint: str) -> str:
    """``owner/alias`` of an endpoint id: the part request-id URLs use."""
    return "/".join(endpoint.split("/")[:2])


def endpoint_matches(path: str, endpoint: str) -> bool:
    """Whether the path before ``/requests/`` (``owner/alias`` or longer) names ``endpoint``."""
    asked = [part for part in path.strip("/").split("/") if part]
    return len(asked) >= 2 and endpoint.split("/")[: len(asked)] == asked


def fal_status(status: JobStatus) -> str:
    if status is JobStatus.QUEUED:
        return "IN_QUEUE"
    if status is JobStatus.RUNNING:
        return "IN_PROGRESS"
    return "COMPLETED"


def submit_body(job: Job, urls: RequestUrls, queue_position: int) -> dict[str, Any]:
    """PROTOCOL.md §3."""
    return {
        "status": "IN_QUEUE",
        "request_id": job.id,
        **urls.as_dict(),
        "queue_position": queue_position,
        "logs": None,
        "metrics": {},
        "gateway_request_id": job.id,
    }


def status_body(
    job: Job,
    urls: RequestUrls,
    *,
    queue_position: int | None,
    logs: list[JobEvent] | None,
) -> dict[str, Any]:
    """PROTOCOL.md §4. ``logs`` is None unless the client asked for them."""
    body: dict[str, Any] = {
        "status": fal_status(job.status),
        "request_id": job.id,
        **urls.as_dict(),
        "logs": None if logs is None else [log_entry(event) for event in logs],
        "metrics": _metrics(job),
    }
    if job.status is JobStatus.QUEUED:
        body["queue_position"] = queue_position or 0
    if job.progress is not None and not job.status.is_final:
        body["progress"] = {"step": job.progress.step, "total": job.progress.total}
    if job.status.is_final and job.status is not JobStatus.SUCCEEDED:
        body["error"] = job.error or "Request failed"
        body["error_type"] = job.error_type or "internal_error"
    return body


def _metrics(job: Job) -> dict[str, float]:
    """Read from the result record as it is (every poll of a finished job asks)."""
    if job.status is not JobStatus.SUCCEEDED or not isinstance(job.result, dict):
        return {}
    timings = job.result.get("timings")
    inference_s = timings.get("inference") if isinstance(timings, dict) else None
    if isinstance(inference_s, int | float):
        return {"inference_time": float(inference_s)}
    return {}


def log_entry(event: JobEvent) -> dict[str, str]:
    """One fal log line; the timestamp is ISO-8601 in UTC."""
    return {
        "message": event.message,
        "level": event.level,
        "source": "USER",
        "timestamp": datetime.fromtimestamp(event.at, tz=UTC).isoformat(),
    }


def error_status_code(job: Job) -> int:
    """The result endpoint's status code for a failed or cancelled job."""
    return ERROR_STATUS_CODES.get(job.error_type or "", 500)


def error_body(job: Job) -> dict[str, str]:
    return {
        "detail": job.error or "Request failed",
        "error_type": job.error_type or "internal_error",
    }
