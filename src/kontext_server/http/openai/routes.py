"""OpenAI's images API: ``POST /v1/images/edits`` (PROTOCOL.md §11) on the same queue.

Multipart fields, as the official ``openai`` SDK sends them (``client.images.edit``):

* ``image`` (one file) or repeated ``image[]`` (several; ``image[0]``.. works too): png,
  jpeg, webp, gif, avif or bmp, each at most ``max_image_bytes``. One image runs
  ``fal-ai/flux-pro/kontext/max``, several ``.../max/multi``;
* ``prompt`` (required); ``n`` 1..4 (default 1);
* ``size``: ``auto`` (follow the input) or one of ``SIZES``, read as an aspect ratio: the
  engine picks its own resolution near 1 megapixel, so the answer's ``size`` says what came;
* ``response_format``: ``b64_json`` (default, as GPT image models answer) or ``url`` (a file on
  this server); ``output_format``: ``png`` (default) or ``jpeg`` (``webp`` is refused);
* ``model``, ``quality``, ``background``, ``user``, ...: accepted and ignored; ``mask`` and
  ``stream=true`` are refused (Kontext edits from the prompt alone and does not stream).

The answer comes once the edit is done (like ``POST /run/``; a client that hangs up cancels
it): ``{created, data: [{b64_json} | {url}], output_format, size}``. Errors are OpenAI's
``{"error": {message, type, param, code}}`` with 400, 401/403, 413, 429 (``Retry-After``),
500 or 504; a failed edit carries ``x-should-retry: false`` so the SDK does not run it again.
Authentication: ``Authorization: Bearer <API key>``, with the fal routes' rules.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message

from kontext_server.core.auth import AuthError, Principal
from kontext_server.core.service import QueueFullError
from kontext_server.domain.editing import EditInput
from kontext_server.domain.jobs import Job, JobStatus
from kontext_server.http.bodies import BodyTooLargeError, read_capped_body
from kontext_server.http.context import ApiContext, Context, authenticate, site_base
from kontext_server.http.fal.inputs import FieldError, validate_fal_input
from kontext_server.http.fal.results import render_output
from kontext_server.http.fal.schemas import MAX_ENDPOINT, MAX_IMAGE_URLS, MULTI_ENDPOINT
from kontext_server.http.fal.wire import ERROR_STATUS_CODES
from kontext_server.http.images import image_data_uri, sniff_image_type
from kontext_server.http.waiting import wait_until_final

__all__ = ["OPENAI_PREFIX", "SIZES", "OpenAIError", "openai_router", "stored_input"]

OPENAI_PREFIX = "/v1"
# OpenAI's edit sizes -> the aspect ratio asked of the engine ("auto": follow the input)
SIZES = {
    "256x256": "1:1",
    "512x512": "1:1",
    "1024x1024": "1:1",
    "1536x1024": "3:2",
    "1024x1536": "2:3",
}
_RESPONSE_FORMATS = ("b64_json", "url")
_OUTPUT_FORMATS = ("png", "jpeg")
_MAX_N = 4
_MAX_BODY_IMAGES = 4  # the body cap holds this many images of the largest allowed size
_IMAGE_FIELD = re.compile(r"^image(\[\d*\])?$")
# the worker's error type for a blocked prompt or a flagged input image (safety_policy.py)
_CONTENT_POLICY_ERROR_TYPE = "content_policy_violation"
_REFUSALS = frozenset({_CONTENT_POLICY_ERROR_TYPE})
_FAL_TO_OPENAI = {
    "image_url": "image",
    "image_urls": "image",
    "num_images": "n",
    "aspect_ratio": "size",
}


class OpenAIError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status_code, headers=self.headers)


@dataclass(frozen=True, slots=True)
class _EditRequest:
    prompt: str
    images: list[str]  # data: URIs
    n: int
    aspect_ratio: str | None
    response_format: str
    output_format: str


def openai_router() -> APIRouter:
    """``POST /v1/images/edits`` (mount before the fal catch-all)."""
    router = APIRouter(prefix=OPENAI_PREFIX, tags=["openai"])
    router.add_api_route("/images/edits", edit_images, methods=["POST"])
    return router


async def edit_images(request: Request, context: Context) -> JSONResponse:
    """Edit, wait, answer the images (or an OpenAI-style error)."""
    try:
        principal = _authenticate(context, request)
        edit = await _read_edit_request(request, context)
        job = await _submit(context, request, principal, edit)
        final = await wait_until_final(context, request, job, principal.owner)
        if final is None:
            return OpenAIError(499, "The client disconnected; the edit was cancelled").response()
        return _answer(context, request, final, edit)
    except OpenAIError as exc:
        return exc.response()


def _authenticate(context: ApiContext, request: Request) -> Principal:
    try:
        return authenticate(context, request, None)
    except AuthError as exc:
        codes = {401: "invalid_api_key", 429: "rate_limit_exceeded"}
        retry_after_s = exc.retry_after_s  # 429: too many wrong keys from this client
        headers = {"retry-after": str(retry_after_s)} if retry_after_s is not None else None
        raise OpenAIError(
            exc.status_code,
            exc.detail,
            code=codes.get(exc.status_code, "forbidden"),
            headers=headers,
        ) from None


# --- reading the multipart body --------------------------------------------------------------


async def _read_edit_request(request: Request, context: ApiContext) -> _EditRequest:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise OpenAIError(
            400,
            "send the edit as multipart/form-data with the fields image (or image[]) and "
            f"prompt; got content-type {content_type[:80]!r}",
        )
    form = await _read_form(request, context)
    try:
        images = await _read_images(form, context.max_data_uri_bytes)
        return _parse_fields(form, images)
    finally:
        await form.close()


async def _read_form(request: Request, context: ApiContext) -> FormData:
    max_bytes = _MAX_BODY_IMAGES * context.max_data_uri_bytes + 1024 * 1024
    try:
        body = await read_capped_body(request, max_bytes)
    except BodyTooLargeError as exc:
        raise OpenAIError(413, f"{exc}; send smaller or fewer images", code="too_large") from None

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_files=MAX_IMAGE_URLS + 1)
    except StarletteHTTPException as exc:
        raise OpenAIError(400, f"the multipart body cannot be read: {exc.detail}") from None


async def _read_images(form: FormData, max_bytes: int) -> list[str]:
    uploads = [value for key, value in form.multi_items() if _IMAGE_FIELD.match(key)]
    if not uploads:
        raise OpenAIError(
            400,
            "image is required: send one file as image or several as image[]",
            param="image",
            code="missing_required_parameter",
        )
    if len(uploads) > MAX_IMAGE_URLS:
        raise OpenAIError(
            400, f"at most {MAX_IMAGE_URLS} images may be sent; got {len(uploads)}", param="image"
        )
    return [await _image_uri(upload, index, max_bytes) for index, upload in enumerate(uploads)]


async def _image_uri(upload: str | UploadFile, index: int, max_bytes: int) -> str:
    if not isinstance(upload, UploadFile):
        raise OpenAIError(400, f"image {index + 1} must be a file, not a text field", param="image")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OpenAIError(
            400,
            f"image {index + 1} is larger than {max_bytes} bytes",
            param="image",
            code="too_large",
        )
    media_type = sniff_image_type(data)
    if media_type is None:
        raise OpenAIError(
            400,
            f"image {index + 1} ({upload.filename or 'unnamed'}) is not a png, jpeg, webp, gif, "
            "avif or bmp image",
            param="image",
            code="invalid_image_format",
        )
    return image_data_uri(data, media_type)


def _parse_fields(form: FormData, images: list[str]) -> _EditRequest:
    if form.get("mask") is not None:
        raise OpenAIError(
            400,
            "mask is not supported: FLUX.1 Kontext edits from the prompt alone; say in the "
            "prompt which part to change",
            param="mask",
        )
    if _text(form, "stream", "false").lower() in ("true", "1"):
        raise OpenAIError(400, "stream=true is not supported; leave it out", param="stream")
    size = _choice(form, "size", "auto", ("auto", *SIZES))
    return _EditRequest(
        prompt=_text(form, "prompt", ""),
        images=images,
        n=_count(form),
        aspect_ratio=SIZES.get(size),
        response_format=_choice(form, "response_format", "b64_json", _RESPONSE_FORMATS),
        output_format=_output_format(form),
    )


def _text(form: FormData, name: str, default: str) -> str:
    value = form.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise OpenAIError(400, f"{name} must be a text field, not a file", param=name)
    return value.strip()


def _count(form: FormData) -> int:
    raw = _text(form, "n", "1")
    if not raw.isdigit() or not 1 <= int(raw) <= _MAX_N:
        raise OpenAIError(
            400,
            f"n must be an integer from 1 to {_MAX_N}; got {raw[:40]!r}",
            param="n",
            code="invalid_value",
        )
    return int(raw)


def _choice(form: FormData, name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = _text(form, name, default) or default
    if value not in allowed:
        shown = ", ".join(allowed)
        raise OpenAIError(
            400,
            f"{name} must be one of {shown}; got {value[:40]!r}",
            param=name,
            code="invalid_value",
        )
    return value


def _output_format(form: FormData) -> str:
    value = (_text(form, "output_format", "png") or "png").lower()
    if value == "webp":
        raise OpenAIError(
            400,
            "output_format webp is not supported: this server writes png or jpeg",
            param="output_format",
            code="invalid_value",
        )
    if value == "jpg":
        return "jpeg"
    if value not in _OUTPUT_FORMATS:
        raise OpenAIError(
            400,
            f"output_format must be png or jpeg; got {value[:40]!r}",
            param="output_format",
            code="invalid_value",
        )
    return value


# --- submitting and answering ----------------------------------------------------------------


async def _submit(
    context: ApiContext, request: Request, principal: Principal, edit: _EditRequest
) -> Job:
    endpoint, edit_input = stored_input(edit, context.max_data_uri_bytes)
    try:
        outcome = await context.service.submit_async(
            endpoint, edit_input, owner=principal.owner, base_url=site_base(request)
        )
    except QueueFullError as exc:
        raise OpenAIError(
            429,
            str(exc),
            kind="requests",
            code="rate_limit_exceeded",
            headers={"retry-after": str(exc.retry_after_s)},
        ) from None
    return outcome.job


def stored_input(edit: _EditRequest, max_data_uri_bytes: int) -> tuple[str, EditInput]:
    """The fal endpoint and the edit of an OpenAI edit request, judged by the fal endpoint's
    rules; raises ``OpenAIError`` (400, OpenAI's names) when something is not allowed."""
    single = len(edit.images) == 1
    endpoint = MAX_ENDPOINT if single else MULTI_ENDPOINT
    fal_input = {
        "prompt": edit.prompt,
        **({"image_url": edit.images[0]} if single else {"image_urls": edit.images}),
        "num_images": edit.n,
        "aspect_ratio": edit.aspect_ratio,
        "output_format": edit.output_format,
        # b64_json: the worker inlines the images (data: URIs) and stores no file
        "sync_mode": edit.response_format == "b64_json",
    }
    validated, errors = validate_fal_input(
        endpoint, fal_input, max_data_uri_bytes=max_data_uri_bytes
    )
    if validated is None:
        raise _as_openai_error(errors[0])
    return endpoint, validated


def _as_openai_error(error: FieldError) -> OpenAIError:
    field = str(error.loc[0]) if error.loc else None
    param = _FAL_TO_OPENAI.get(field or "", field)
    message = error.message
    if field and param and field != param:
        message = message.replace(field, param)
    return OpenAIError(400, message, param=param, code="invalid_value")


def _answer(context: ApiContext, request: Request, job: Job, edit: _EditRequest) -> JSONResponse:
    if job.status is not JobStatus.SUCCEEDED:
        raise _job_error(job)
    output = render_output(job, site_base(request), context.files)
    images: list[dict[str, Any]] = output.get("images") or []
    data = [_image_entry(image, edit.response_format) for image in images]
    body: dict[str, Any] = {
        "created": int(job.finished_at or time.time()),
        "data": data,
        "output_format": edit.output_format,
    }
    if images and images[0].get("width") and images[0].get("height"):
        body["size"] = f"{images[0]['width']}x{images[0]['height']}"
    return JSONResponse(body)


def _image_entry(image: dict[str, Any], response_format: str) -> dict[str, Any]:
    url = str(image.get("url") or "")
    if response_format == "url":
        return {"url": url}
    _, _, encoded = url.partition(",")  # a data: URI (sync_mode): the part after the comma
    return {"b64_json": encoded}


def _job_error(job: Job) -> OpenAIError:
    error_type = job.error_type or "internal_error"
    status_code = ERROR_STATUS_CODES.get(error_type, 500)
    status_code = 400 if status_code == 422 or error_type in _REFUSALS else status_code
    if error_type == _CONTENT_POLICY_ERROR_TYPE:
        error_type = "moderation_blocked"  # OpenAI's code for a refused request
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    message = job.error or f"The edit ended with status {job.status}"
    # The edit ran (or was refused by the worker): a retry by the SDK would pay for it again.
    return OpenAIError(
        status_code, message, code=error_type, kind=kind, headers={"x-should-retry": "false"}
    )
