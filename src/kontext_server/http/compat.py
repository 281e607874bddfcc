"""What the neighbouring APIs (BFL's ``http/bfl_api.py``, OpenAI's ``http/openai_api.py``)
share: authentication with another header, capped body reading, images as ``data:`` URIs,
the mapping of their fields onto a fal endpoint input, and waiting for a job to finish.

Both translate their requests into the input of a fal endpoint (PROTOCOL.md §8) and submit it
to the same queue, so workers need no change.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from kontext_server.core.auth import Principal
from kontext_server.domain.jobs import Job
from kontext_server.http.context import ApiContext
from kontext_server.http.schemas import ENDPOINTS
from kontext_server.http.sse import fresh_job

__all__ = [
    "MAX_ENDPOINT",
    "MULTI_ENDPOINT",
    "BodyTooLargeError",
    "FieldError",
    "authenticate",
    "image_data_uri",
    "read_capped_body",
    "sniff_image_type",
    "validate_fal_input",
    "wait_until_final",
]

MAX_ENDPOINT = "fal-ai/flux-pro/kontext/max"
MULTI_ENDPOINT = "fal-ai/flux-pro/kontext/max/multi"

# Magic numbers of the image types the worker decodes (fetch.py allows the same media types).
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"BM", "image/bmp"),
)


class BodyTooLargeError(Exception):
    """The request body is over ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"The request body is larger than {max_bytes} bytes")
        self.max_bytes = max_bytes


@dataclass(frozen=True, slots=True)
class FieldError:
    """One invalid field, named the way the fal input names it (``loc``)."""

    loc: tuple[str | int, ...]
    message: str
    kind: str


def authenticate(context: ApiContext, request: Request, key: str | None) -> Principal:
    """The caller of a request that sends its API key as ``key`` (e.g. BFL's ``x-key``); with
    no such key, the ``Authorization`` header counts. Raises ``AuthError`` (401/403) with the
    same rules as the fal routes (auth off: loopback only, unless ``insecure_no_auth``)."""
    client_host = request.client.host if request.client else None
    authorization = f"Key {key.strip()}" if key and key.strip() else None
    authorization = authorization or request.headers.get("authorization")
    return context.authenticator.authenticate(authorization, client_host)


async def read_capped_body(request: Request, max_bytes: int) -> bytes:
    """The whole body; raises ``BodyTooLargeError`` as soon as it is over ``max_bytes``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLargeError(max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise BodyTooLargeError(max_bytes)
    return bytes(body)


def sniff_image_type(data: bytes) -> str | None:
    """The media type of image bytes from their first bytes (png, jpeg, gif, bmp, webp,
    avif), or ``None`` when they are none of these."""
    for offset, magic, media_type in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "image/avif"
    return None


def image_data_uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def validate_fal_input(
    endpoint: str, fal_input: dict[str, Any], *, max_data_uri_bytes: int
) -> tuple[dict[str, Any], list[FieldError]]:
    """``fal_input`` validated by the endpoint's input model: the stored JSON and no errors,
    or ``{}`` and the errors with the model's messages (they say what is allowed)."""
    model = ENDPOINTS[endpoint]
    try:
        validated = model.model_validate(
            fal_input, context={"max_data_uri_bytes": max_data_uri_bytes}
        )
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        return {}, [FieldError(tuple(e["loc"]), str(e["msg"]), str(e["type"])) for e in errors]
    return validated.model_dump(mode="json"), []


async def wait_until_final(
    context: ApiContext, request: Request, job: Job, owner: str | None
) -> Job | None:
    """Poll the store until ``job`` is final (like ``POST /run/``), through store outages. A
    client that hangs up cancels its request; then ``None``."""
    read: Callable[[str], Job | None] = context.service.store.get
    while not job.status.is_final:
        await anyio.sleep(context.poll_interval_s)
        if await request.is_disconnected():
            cancel = functools.partial(context.service.cancel, job.id, owner)
            await run_in_threadpool(cancel)
            return None
        job = await fresh_job(read, job)
    return job
