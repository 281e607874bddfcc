"""fal's shapes of a finished job's output: the endpoint's output JSON with file URLs
(PROTOCOL.md §8), which the other skins build on, and fal's webhook body (PROTOCOL.md §9)."""

from __future__ import annotations

import logging
from typing import Any

from kontext_server.domain.editing import OutputImage
from kontext_server.domain.jobs import Job, JobStatus
from kontext_server.files.base import FileStore

__all__ = ["render_output", "webhook_payload"]

log = logging.getLogger(__name__)


def render_output(job: Job, base_url: str, files: FileStore) -> dict[str, Any]:
    """The endpoint's output JSON (PROTOCOL.md §8) of a succeeded job: every stored image
    gets a ``url`` under ``base_url`` (where the client reached this server)."""
    output = job.output
    if output is None:
        raise ValueError(f"job {job.id} has no result (status {job.status})")
    return {
        "images": [_render_image(image, base_url, files) for image in output.images],
        "timings": output.timings,
        "seed": output.seed,
        "has_nsfw_concepts": list(output.nsfw_flags),
        "prompt": output.prompt,
        "random_weights": output.random_weights,
    }


def _render_image(image: OutputImage, base_url: str, files: FileStore) -> dict[str, Any]:
    return {
        "url": files.url(image.file_key, base_url) if image.file_key else image.url,
        "width": image.width,
        "height": image.height,
        "content_type": image.content_type,
        "file_name": image.file_name,
        "file_size": image.file_size,
    }


def webhook_payload(job: Job, files: FileStore) -> dict[str, Any]:
    """fal's webhook body (PROTOCOL.md §9); file URLs use where the submitter reached us."""
    body: dict[str, Any] = {"request_id": job.id, "gateway_request_id": job.id}
    if job.status is not JobStatus.SUCCEEDED:
        error = job.error or f"Request ended with status {job.status}"
        detail = {"detail": error, "error_type": job.error_type or "internal_error"}
        return {**body, "status": "ERROR", "error": error, "payload": detail}
    try:
        payload: dict[str, Any] | None = render_output(job, job.base_url or "", files)
    except Exception as exc:  # the output is data of a finished job: report, never raise
        log.exception("cannot render the output of job %s for its webhook", job.id)
        return {**body, "status": "OK", "payload": None, "payload_error": str(exc)}
    return {**body, "status": "OK", "payload": payload}
