"""fal's storage endpoints (PROTOCOL.md §10): clients upload files to this server.

* ``POST /rest/storage/auth/token?storage_type=...``: a CDN token for the caller's API key;
* ``POST /cdn/files/upload`` (``Authorization: Bearer <token>``): raw bytes ->
  ``{"access_url": ...}``;
* ``POST /rest/storage/upload/initiate?storage_type=...``: ``{content_type, file_name}`` ->
  ``{upload_url, file_url}``;
* ``PUT /cdn/uploads/{ticket}`` (the ``upload_url``): the bytes of an initiated upload.

``fal_client.upload_file()`` uses the token pair (its fallback is initiate + PUT); the JS
client's ``fal.storage.upload()`` uses initiate + PUT. The multipart variants (files over
90-100 MB) are answered 413, as is any upload over ``max_upload_bytes``. ``/cdn/files/upload``
also accepts an API key (``Key <key>``) instead of a token. What is stored, where, and for
how long is ``kontext_server.core.uploads``' business.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from kontext_server.core.auth import AuthError, Principal, key_from_authorization
from kontext_server.core.uploads import UploadCleanupLoop, UploadService, UploadTooLargeError
from kontext_server.domain.json_limits import JSONLimitError, json_rules, parse_json
from kontext_server.http.bodies import BodyTooLargeError, read_capped_body
from kontext_server.http.context import ApiContext, Caller, Context, site_base
from kontext_server.http.fal.schemas import json_body_schema
from kontext_server.http.ids import is_upload_ticket

__all__ = ["CDN_PREFIX", "REST_PREFIX", "lifecycle_ttl_s", "storage_router"]

REST_PREFIX = "/rest"  # fal's rest.fal.ai
CDN_PREFIX = "/cdn"  # fal's v3.fal.media upload host
_DEFAULT_CONTENT_TYPE = "application/octet-stream"
_LIFECYCLE_HEADERS = ("x-fal-object-lifecycle", "x-fal-object-lifecycle-preference")
_MAX_INITIATE_BYTES = 64 * 1024


class InitiateUpload(BaseModel):
    """The JSON body of ``/storage/upload/initiate`` (both clients send these two fields)."""

    model_config = ConfigDict(extra="ignore")

    content_type: str = _DEFAULT_CONTENT_TYPE
    file_name: str | None = None


def storage_router(context: ApiContext) -> APIRouter:
    """The storage routes over ``context.files``; the router's lifespan runs the cleanup of
    expired uploads (every ``cleanup_interval_s``)."""
    uploads = UploadService.from_settings(context.settings, context.files)
    cleanup = UploadCleanupLoop(context.files, interval_s=context.settings.cleanup_interval_s)
    routes = _StorageRoutes(uploads)
    router = APIRouter(tags=["storage"], lifespan=cleanup.lifespan)
    router.add_api_route(f"{REST_PREFIX}/storage/auth/token", routes.token, methods=["POST"])
    router.add_api_route(
        f"{REST_PREFIX}/storage/upload/initiate",
        routes.initiate,
        methods=["POST"],
        openapi_extra=json_body_schema(InitiateUpload),
    )
    router.add_api_route(
        f"{REST_PREFIX}/storage/upload/initiate-multipart", routes.no_multipart, methods=["POST"]
    )
    router.add_api_route(f"{CDN_PREFIX}/files/upload", routes.upload, methods=["POST"])
    router.add_api_route(
        f"{CDN_PREFIX}/files/upload/multipart", routes.no_multipart, methods=["POST"]
    )
    router.add_api_route(f"{CDN_PREFIX}/uploads/{{ticket}}", routes.put, methods=["PUT"])
    return router


class _StorageRoutes:
    def __init__(self, uploads: UploadService) -> None:
        self._uploads = uploads

    def token(self, request: Request, principal: Caller) -> dict[str, Any]:
        """A CDN token bound to the caller's API key, valid for an hour."""
        issued = self._uploads.issue_token(principal.owner)
        expires_at = dt.datetime.fromtimestamp(issued.expires_at_s, dt.UTC)
        return {
            "token": issued.token,
            "token_type": "Bearer",
            "base_url": f"{site_base(request)}{CDN_PREFIX}",
            "expires_at": expires_at.isoformat(),
        }

    async def initiate(self, request: Request, principal: Caller) -> dict[str, str]:
        """Where to ``PUT`` the bytes (a signed URL) and where the file will be served."""
        body = await _read_initiate(request)
        ttl_s = lifecycle_ttl_s(_lifecycle_headers(request), self._uploads.retention_s)
        prepared = self._uploads.prepare(principal.owner, body.file_name, body.content_type, ttl_s)
        base = site_base(request)
        return {
            "upload_url": f"{base}{CDN_PREFIX}/uploads/{prepared.ticket}",
            "file_url": self._uploads.files.url(prepared.key, base),
        }

    async def upload(self, request: Request, context: Context) -> JSONResponse:
        """Store the request body as a new upload; answer its URL."""
        await run_in_threadpool(self._uploader, request, context)
        ttl_s = lifecycle_ttl_s(_lifecycle_headers(request), self._uploads.retention_s)
        content_type = request.headers.get("content-type", _DEFAULT_CONTENT_TYPE)
        key = self._uploads.new_key(request.headers.get("x-fal-file-name"), content_type, ttl_s)
        return await self._store(request, key)

    async def put(self, ticket: str, request: Request) -> JSONResponse:
        """The bytes of an upload started with ``initiate``; the URL is the permission."""
        if not is_upload_ticket(ticket):  # not one we could have issued
            return JSONResponse({"detail": "Upload URL not found"}, status_code=404)
        key = self._uploads.ticket_key(ticket)
        return await self._store(request, key)

    def no_multipart(self) -> JSONResponse:
        limit = self._uploads.max_bytes
        detail = (
            f"Multipart uploads are not supported: this server accepts files of at most "
            f"{limit:,} bytes, sent in one request"
        )
        return JSONResponse({"detail": detail}, status_code=413)

    def _uploader(self, request: Request, context: ApiContext) -> Principal:
        """A CDN token from ``/storage/auth/token``, or else an API key (``auth.py``)."""
        authorization = request.headers.get("authorization")
        client_host = request.client.host if request.client else None
        credential = key_from_authorization(authorization)
        if credential is None or "." not in credential:  # API keys have no dot, tokens do
            return context.authenticator.authenticate(authorization, client_host)
        try:
            return Principal(owner=self._uploads.token_owner(credential))
        except AuthError as token_error:
            try:  # with authentication off, any header is accepted from loopback
                return context.authenticator.authenticate(authorization, client_host)
            except AuthError:
                raise token_error from None

    async def _store(self, request: Request, key: str) -> JSONResponse:
        try:
            data = await _read_capped(request, self._uploads)
        except UploadTooLargeError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=413)
        stored = await run_in_threadpool(self._uploads.store, key, data)
        url = self._uploads.files.url(key, site_base(request))
        return JSONResponse(
            {
                "access_url": url,
                "file_name": key.rsplit("/", 1)[-1],
                "content_type": stored.content_type,
                "file_size": stored.size,
            }
        )


async def _read_initiate(request: Request) -> InitiateUpload:
    """The body of ``/storage/upload/initiate``, parsed within the JSON limits
    (``json_limits``); 413 past ``_MAX_INITIATE_BYTES``, 422 when it is not such an object."""
    try:
        raw = await read_capped_body(request, _MAX_INITIATE_BYTES)
    except BodyTooLargeError as exc:
        raise HTTPException(413, str(exc)) from None
    try:
        return InitiateUpload.model_validate(parse_json(raw))
    except JSONLimitError as exc:
        message = (
            f"the request body is not valid JSON ({exc}); send {json_rules()}, an object "
            'such as {"content_type": "image/png", "file_name": "cat.png"}'
        )
        errors: list[dict[str, Any]] = [
            {"loc": ("body", exc.position or 0), "msg": message, "type": "json_invalid"}
        ]
    except ValidationError as exc:
        errors = [
            {**error, "loc": ("body", *error["loc"])}
            for error in exc.errors(include_url=False, include_input=False)
        ]
    raise RequestValidationError(errors)


async def _read_capped(request: Request, uploads: UploadService) -> bytes:
    """The body, refused (``UploadTooLargeError``) as soon as it passes the limit: first by
    its declared length, then while it streams in."""
    try:
        return await read_capped_body(request, uploads.max_bytes)
    except BodyTooLargeError as exc:
        uploads.check_size(exc.size)  # raises, with the uploads' own message
        raise


def lifecycle_ttl_s(header_values: list[str | None], retention_s: float) -> float:
    """How long an upload lives: ``expiration_duration_seconds`` from the first readable
    ``X-Fal-Object-Lifecycle(-Preference)`` JSON header, capped at ``retention_s``. Headers
    that cannot be read are ignored, never refused (PROTOCOL.md §2)."""
    for value in header_values:
        if not value:
            continue
        try:
            preference = parse_json(value)
        except JSONLimitError:
            continue
        if not isinstance(preference, dict):
            continue
        seconds = preference.get("expiration_duration_seconds")
        if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds > 0:
            return min(float(seconds), retention_s)
    return retention_s


def _lifecycle_headers(request: Request) -> list[str | None]:
    return [request.headers.get(name) for name in _LIFECYCLE_HEADERS]
