"""Black Forest Labs' API (PROTOCOL.md §11) on the same queue as the fal routes.

* ``POST /v1/flux-kontext-max`` and ``POST /v1/flux-kontext-pro`` (header ``x-key``: one of
  this server's API keys; ``Authorization`` works too; with no key stored, the fal routes'
  loopback rule applies) -> ``{id, polling_url}``. One ``input_image`` becomes a
  ``fal-ai/flux-pro/kontext/max`` job, several (``input_image_2`` .. ``_4``) a
  ``.../max/multi`` job; both names run the same engine. A base64 image becomes a ``data:``
  URI; a URL is fetched by the worker.
* ``GET /v1/get_result?id=`` -> ``{id, status, result, progress, details, preview}`` with
  ``status`` ``Pending`` | ``Ready`` | ``Error`` | ``Request Moderated`` | ``Content
  Moderated`` (404 and ``Task not found`` for an unknown id
  or one of another key); ``result.sample`` is the URL of the first image.
* ``webhook_url`` (+ ``webhook_secret``): BFL's webhook body, signed ``X-BFL-Signature``
  (``http/bfl/wire.py``), sent by the webhook dispatcher with its retries.

Errors are BFL's (FastAPI's) shape: 422 ``{"detail": [{loc, msg, type}]}``, otherwise
``{"detail": "..."}``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, Field, ValidationError

from kontext_server.domain.editing import EditInput
from kontext_server.domain.jobs import Job
from kontext_server.domain.json_limits import JSONLimitError, json_rules, parse_json
from kontext_server.http.bfl import wire as bfl
from kontext_server.http.bodies import BodyTooLargeError, read_capped_body
from kontext_server.http.context import ApiContext, Context, authenticate, site_base
from kontext_server.http.fal.inputs import FieldError, validate_fal_input
from kontext_server.http.fal.results import render_output
from kontext_server.http.fal.schemas import (
    MAX_ENDPOINT,
    MULTI_ENDPOINT,
    SEED_LIMIT,
    FalInput,
    NotBool,
)
from kontext_server.http.ids import is_request_id
from kontext_server.http.images import image_data_uri, sniff_image_type

__all__ = ["BFL_PREFIX", "IMAGE_FIELDS", "BflKontextRequest", "bfl_router", "stored_input"]

BFL_PREFIX = "/v1"
IMAGE_FIELDS = ("input_image", "input_image_2", "input_image_3", "input_image_4")
_MAX_WEBHOOK_URL_CHARS = 2048
_MAX_WEBHOOK_SECRET_CHARS = 256
_URL_SCHEMES = ("http://", "https://", "data:")
_IMAGE_RULE = (
    "must be an http(s) URL, a data: URI or base64-encoded image bytes (jpeg, png, webp, gif, "
    "avif or bmp)"
)
# fal input field -> BFL field, for error messages and locations
_FAL_TO_BFL = {"enhance_prompt": "prompt_upsampling"}


def _check_webhook_url(url: str | None) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an absolute http(s) URL")
    return url.strip()


class BflKontextRequest(FalInput):
    """The body of ``POST /v1/flux-kontext-{max,pro}`` as BFL documents it."""

    _body_rule: ClassVar[str] = (
        "the request body must be a JSON object with at least prompt and input_image"
    )
    _rules: ClassVar[dict[str, str]] = {
        "prompt": "prompt must be a non-empty string (the edit instruction)",
        **{name: f"{name} {_IMAGE_RULE}" for name in IMAGE_FIELDS},
        "seed": f"seed must be an integer with 0 <= seed < 2**63 ({SEED_LIMIT}), or null",
        "aspect_ratio": "aspect_ratio must be a ratio W:H between 21:9 and 9:21, or null",
        "output_format": 'output_format must be "jpeg" or "png"',
        "prompt_upsampling": "prompt_upsampling must be true or false",
        "safety_tolerance": "safety_tolerance must be an integer from 0 (strictest) to 6",
        "webhook_url": (
            f"webhook_url must be an absolute http(s) URL of at most {_MAX_WEBHOOK_URL_CHARS} "
            "characters, or null"
        ),
        "webhook_secret": (
            f"webhook_secret must be a string of at most {_MAX_WEBHOOK_SECRET_CHARS} "
            "characters, or null"
        ),
    }

    prompt: str
    input_image: str | None = None
    input_image_2: str | None = None
    input_image_3: str | None = None
    input_image_4: str | None = None
    seed: Annotated[int | None, Field(ge=0, lt=SEED_LIMIT), NotBool] = None
    aspect_ratio: str | None = None
    output_format: Literal["jpeg", "png"] = "png"
    prompt_upsampling: bool = False
    safety_tolerance: Annotated[int, Field(ge=0, le=6), NotBool] = 2
    webhook_url: Annotated[
        str | None,
        Field(max_length=_MAX_WEBHOOK_URL_CHARS),
        AfterValidator(_check_webhook_url),
    ] = None
    webhook_secret: Annotated[str | None, Field(max_length=_MAX_WEBHOOK_SECRET_CHARS)] = None

    def images(self) -> list[tuple[str, str]]:
        """``(field name, value)`` of every image given, in order."""
        given = ((name, getattr(self, name)) for name in IMAGE_FIELDS)
        return [(name, value) for name, value in given if value]


def bfl_router() -> APIRouter:
    """BFL's submit and poll routes under ``/v1`` (mount before the fal catch-all)."""
    router = APIRouter(prefix=BFL_PREFIX, tags=["bfl"])
    router.add_api_route("/flux-kontext-max", submit, methods=["POST"])
    router.add_api_route("/flux-kontext-pro", submit, methods=["POST"])
    router.add_api_route("/get_result", get_result, methods=["GET"])
    return router


XKey = Annotated[str | None, Header(alias="x-key")]


async def submit(request: Request, context: Context, x_key: XKey = None) -> JSONResponse:
    """Queue an edit; answer ``{id, polling_url}``."""
    principal = authenticate(context, request, x_key)
    body = await _read_request(request, context)
    endpoint, edit = stored_input(body, max_data_uri_bytes=context.max_data_uri_bytes)
    outcome = await context.service.submit_async(
        endpoint,
        edit,
        api=bfl.BFL_API,
        api_data={"webhook_secret": body.webhook_secret},
        owner=principal.owner,
        webhook_url=body.webhook_url,
        base_url=site_base(request),
    )
    job_id = outcome.job.id
    return JSONResponse({"id": job_id, "polling_url": _polling_url(request, job_id)})


def get_result(id: str, request: Request, context: Context, x_key: XKey = None) -> JSONResponse:
    """BFL's poll answer for job ``id``."""
    principal = authenticate(context, request, x_key)
    job = context.service.get(id, principal.owner) if is_request_id(id) else None
    if job is None:  # an id not of our format is not echoed
        shown = id if is_request_id(id) else None
        body = {"id": shown, "status": bfl.TASK_NOT_FOUND, "result": None, "progress": None}
        return JSONResponse(body, status_code=404)
    return JSONResponse(_result_body(context, request, job))


def _result_body(context: ApiContext, request: Request, job: Job) -> dict[str, Any]:
    result = None
    details: dict[str, str | None] | None = None
    status = bfl.bfl_status(job)
    if status == bfl.READY:
        result = bfl.bfl_result(job, render_output(job, site_base(request), context.files))
    elif status == bfl.CONTENT_MODERATED:
        details = {"error": "The content check flagged the output image; no image is returned"}
    elif job.status.is_final:
        details = {"error": job.error or "Request failed", "error_type": job.error_type}
    return {
        "id": job.id,
        "status": status,
        "result": result,
        "progress": bfl.bfl_progress(job),
        "details": details,
        "preview": None,
    }


def _polling_url(request: Request, job_id: str) -> str:
    return f"{site_base(request)}{BFL_PREFIX}/get_result?id={job_id}"


# --- reading and mapping the body ------------------------------------------------------------


async def _read_request(request: Request, context: ApiContext) -> BflKontextRequest:
    # Room for four inline images (base64: 4 bytes per 3), as BFL takes up to input_image_4.
    max_bytes = len(IMAGE_FIELDS) * (context.max_data_uri_bytes * 4 // 3 + 1024) + 64 * 1024
    try:
        raw = await read_capped_body(request, max_bytes)
    except BodyTooLargeError as exc:
        raise HTTPException(
            413, f"{exc}; send large images as http(s) URLs instead of base64"
        ) from None
    try:
        data = parse_json(raw)
    except JSONLimitError as exc:
        message = (
            f"the request body is not valid JSON ({exc}); send {json_rules()}, an object with "
            "prompt and input_image"
        )
        raise _invalid([FieldError((), message, "json_invalid")]) from None
    try:
        return BflKontextRequest.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        found = [FieldError(tuple(e["loc"]), str(e["msg"]), str(e["type"])) for e in errors]
        raise _invalid(found) from None


def stored_input(body: BflKontextRequest, *, max_data_uri_bytes: int) -> tuple[str, EditInput]:
    """The fal endpoint and the edit of a BFL request, judged by the fal endpoint's rules.
    Raises ``RequestValidationError`` (422, BFL field names) when something is not
    allowed."""
    images = body.images()
    if not images:
        message = f"input_image is required: it {_IMAGE_RULE} (text-to-image is not served)"
        raise _invalid([FieldError(("input_image",), message, "missing")])
    sources, errors = _image_sources(images)
    if errors:
        raise _invalid(errors)
    endpoint = MAX_ENDPOINT if len(sources) == 1 else MULTI_ENDPOINT
    fal_input = {
        "prompt": body.prompt,
        **({"image_url": sources[0]} if len(sources) == 1 else {"image_urls": sources}),
        "seed": body.seed,
        "aspect_ratio": body.aspect_ratio,
        "output_format": body.output_format,
        "enhance_prompt": body.prompt_upsampling,
        # BFL counts 0..6, fal "1".."6": 0 and 1 both read as the strictest level.
        "safety_tolerance": str(max(body.safety_tolerance, 1)),
    }
    validated, fal_errors = validate_fal_input(
        endpoint, fal_input, max_data_uri_bytes=max_data_uri_bytes
    )
    if validated is None:
        names = [name for name, _ in images]
        raise _invalid([_as_bfl_error(error, names) for error in fal_errors])
    return endpoint, validated


def _image_sources(images: list[tuple[str, str]]) -> tuple[list[str], list[FieldError]]:
    sources: list[str] = []
    errors: list[FieldError] = []
    for name, value in images:
        source = _image_source(value.strip())
        if source is None:
            errors.append(FieldError((name,), f"{name} {_IMAGE_RULE}", "image_source"))
        else:
            sources.append(source)
    return sources, errors


def _image_source(value: str) -> str | None:
    """A URL or data: URI as given; base64 bytes as a data: URI; ``None`` if neither."""
    if value.lower().startswith(_URL_SCHEMES):
        return value
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    media_type = sniff_image_type(data)
    return None if media_type is None else image_data_uri(data, media_type)


def _as_bfl_error(error: FieldError, image_names: list[str]) -> FieldError:
    """A fal input error told in BFL's field names."""
    loc = error.loc
    message = error.message
    if loc and loc[0] == "image_url":
        loc = (image_names[0],)
        message = message.replace("image_url", image_names[0])
    elif loc and loc[0] == "image_urls":
        index = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
        name = image_names[min(index, len(image_names) - 1)]
        loc = (name,)
        message = message.replace("image_urls", name)
    elif loc and isinstance(loc[0], str) and loc[0] in _FAL_TO_BFL:
        loc = (_FAL_TO_BFL[loc[0]], *loc[1:])
        message = message.replace(str(error.loc[0]), str(loc[0]))
    return FieldError(loc, message, error.kind)


def _invalid(errors: list[FieldError]) -> RequestValidationError:
    return RequestValidationError(
        [
            {"loc": ("body", *error.loc), "msg": error.message, "type": error.kind}
            for error in errors
        ]
    )
