"""Reading a submit: the JSON body, the endpoint's input model, fal's headers and the webhook.

Everything that is wrong is answered 422 with a FastAPI-style ``detail`` list whose messages
say what is allowed; nothing here touches the network.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from kontext_server.domain.errors import ImageFetchError
from kontext_server.domain.jobs import PRIORITY_LOW, PRIORITY_NORMAL
from kontext_server.domain.json_limits import JSONLimitError, json_rules, parse_json
from kontext_server.http.bodies import BodyTooLargeError, read_capped_body
from kontext_server.http.fal.schemas import ENDPOINTS, FalInput
from kontext_server.net.fetch import SafeFetcher, literal_addresses, parsed_url

__all__ = [
    "SubmitOptions",
    "input_model",
    "own_files_check",
    "precheck_urls",
    "read_input",
    "submit_options",
    "webhook_url",
]

log = logging.getLogger(__name__)

_PRIORITIES = {"normal": PRIORITY_NORMAL, "low": PRIORITY_LOW}
_TRUTHY = frozenset({"1", "true", "yes", "on"})
_MAX_IDEMPOTENCY_KEY_CHARS = 255
_MAX_WEBHOOK_URL_CHARS = 2048


@dataclass(frozen=True, slots=True)
class SubmitOptions:
    """fal's request headers, in domain words."""

    priority: int = PRIORITY_NORMAL
    start_timeout_s: float | None = None
    retry: bool = True
    idempotency_key: str | None = None
    retention_s: float | None = None  # X-Fal-Object-Lifecycle-Preference; None: the default


def input_model(endpoint: str) -> type[FalInput]:
    """The input model of a served endpoint; 404 that lists the served ones otherwise."""
    model = ENDPOINTS.get(endpoint.strip("/"))
    if model is None:
        served = ", ".join(ENDPOINTS)
        raise HTTPException(404, f"Unknown endpoint {endpoint!r}; this server serves: {served}")
    return model


async def read_input(
    request: Request, model: type[FalInput], *, max_body_bytes: int, max_data_uri_bytes: int
) -> FalInput:
    """The request's body validated by the endpoint's model (422 with its messages)."""
    data = _parse_json(await _read_body(request, max_body_bytes))
    try:
        validated = model.model_validate(data, context={"max_data_uri_bytes": max_data_uri_bytes})
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in errors]
        ) from None
    return validated


async def _read_body(request: Request, max_body_bytes: int) -> bytes:
    try:
        return await read_capped_body(request, max_body_bytes)
    except BodyTooLargeError as exc:
        raise HTTPException(
            413, f"{exc}; send large images as http(s) URLs instead of data: URIs"
        ) from None


def _parse_json(body: bytes) -> Any:
    try:
        return parse_json(body)
    except JSONLimitError as exc:
        raise _invalid(
            ("body", exc.position or 0),
            "json_invalid",
            f"the request body is not valid JSON ({exc}); send {json_rules()}, an object "
            'such as {"prompt": "...", "image_url": "https://..."}',
        ) from None


def submit_options(request: Request) -> SubmitOptions:
    """Priority, start deadline, retry, idempotency key and retention from the request's
    headers. ``X-Fal-Runner-Hint`` is accepted and unused."""
    headers = request.headers
    return SubmitOptions(
        priority=_priority(headers.get("x-fal-queue-priority")),
        start_timeout_s=_start_timeout_s(
            headers.get("x-fal-request-start-timeout") or headers.get("x-fal-request-timeout")
        ),
        retry=(headers.get("x-fal-no-retry") or "").strip().lower() not in _TRUTHY,
        idempotency_key=_idempotency_key(headers.get("idempotency-key")),
        retention_s=_retention_s(headers.get("x-fal-object-lifecycle-preference")),
    )


def _priority(value: str | None) -> int:
    if value is None or not value.strip():
        return PRIORITY_NORMAL
    priority = _PRIORITIES.get(value.strip().lower())
    if priority is None:
        raise _invalid(
            ("header", "x-fal-queue-priority"),
            "enum",
            f"X-Fal-Queue-Priority must be 'normal' or 'low'; got {value!r}",
        )
    return priority


def _start_timeout_s(value: str | None) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise _invalid(
            ("header", "x-fal-request-timeout"),
            "greater_than",
            f"X-Fal-Request-Timeout must be a number of seconds greater than 0; got {value!r}",
        )
    return seconds


def _idempotency_key(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    if len(value) > _MAX_IDEMPOTENCY_KEY_CHARS:
        raise _invalid(
            ("header", "idempotency-key"),
            "string_too_long",
            f"Idempotency-Key must be at most {_MAX_IDEMPOTENCY_KEY_CHARS} characters",
        )
    return value.strip()


def _retention_s(value: str | None) -> float | None:
    """``{"expiration_duration_seconds": N}`` -> N. fal's rule for its hint headers is "honour
    where meaningful, never reject": anything else is logged and ignored (store default)."""
    if value is None or not value.strip():
        return None
    seconds = _expiration_duration_s(value)
    if seconds is None:
        log.warning(
            "ignoring X-Fal-Object-Lifecycle-Preference %r: expected "
            '{"expiration_duration_seconds": <seconds greater than 0>}; the default retention '
            "applies",
            value[:200],
        )
    return seconds


def _expiration_duration_s(value: str) -> float | None:
    try:
        preference = parse_json(value)
    except JSONLimitError:
        return None
    raw = preference.get("expiration_duration_seconds") if isinstance(preference, dict) else None
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return None
    try:
        seconds = float(raw)
    except (ValueError, OverflowError):
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def webhook_url(request: Request) -> str | None:
    """``?fal_webhook=``: an absolute http(s) URL; the dispatcher checks where it points."""
    url = request.query_params.get("fal_webhook")
    if url is None or not url.strip():
        return None
    parts = urlsplit(url.strip())
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or len(url) > _MAX_WEBHOOK_URL_CHARS
        or not url.isprintable()  # control characters (NUL cannot even be stored)
    ):
        raise _invalid(
            ("query", "fal_webhook"),
            "url_parsing",
            f"fal_webhook must be an absolute http(s) URL of at most {_MAX_WEBHOOK_URL_CHARS} "
            f"characters; got {url[:80]!r}",
        )
    return url.strip()


def precheck_urls(
    validated: FalInput,
    webhook: str | None,
    checker: SafeFetcher,
    *,
    is_own_file: Callable[[str], bool] = lambda url: False,
) -> None:
    """Refuse, at submit, the image and webhook URLs that can be judged without DNS (address
    literals in any spelling, localhost, schemes, ports): a clear 422 now instead of a failed
    request later. Names are checked again when fetched (worker) or delivered to (webhook).
    Image URLs for which ``is_own_file`` is true (this server's own uploads and outputs; see
    ``own_files_check``) are read by the worker from the file store, never fetched, so they
    pass."""
    targets: list[tuple[tuple[str | int, ...], str, str]] = []
    image_url = getattr(validated, "image_url", None)
    if isinstance(image_url, str):
        targets.append((("body", "image_url"), image_url, "image_url"))
    for index, url in enumerate(getattr(validated, "image_urls", None) or []):
        targets.append((("body", "image_urls", index), url, f"image_urls[{index}]"))
    if webhook is not None:
        targets.append((("query", "fal_webhook"), webhook, "fal_webhook"))
    errors: list[dict[str, Any]] = []
    for loc, url, label in targets:
        if not url.startswith(("http://", "https://")):
            continue  # data: URIs were checked by the schema
        if loc[0] == "body" and is_own_file(url):
            continue
        try:
            checker.precheck(url, label=label)
        except ImageFetchError as exc:
            errors.append({"loc": loc, "msg": str(exc), "type": "url_not_allowed"})
    if errors:
        raise RequestValidationError(errors)


def own_files_check(request: Request) -> Callable[[str], bool]:
    """Whether a URL links to this server's own ``/files/``, judged by the address and port
    of the socket the request arrived on (the ASGI ``server``), never by the ``Host`` header,
    which the client chooses. Host names pass the submit check anyway (they are resolved and
    checked when fetched); this matters for address literals and ``localhost``, e.g.
    ``http://127.0.0.1:8000/files/...`` sent to a server listening there."""
    server = request.scope.get("server")
    files_path = f"{request.scope.get('root_path', '')}/files/"

    def is_own_file(url: str) -> bool:
        if not server or server[1] is None:
            return False  # a Unix socket: no address to compare
        try:
            parts = parsed_url(url)
            host = parts.raw_host.decode("ascii")
        except (httpx.InvalidURL, TypeError, UnicodeDecodeError):
            return False
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if port != server[1] or not parts.path.startswith(files_path):
            return False
        addresses = literal_addresses(host, port)
        return addresses is not None and str(server[0]) in addresses

    return is_own_file


def _invalid(loc: tuple[str | int, ...], kind: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": loc, "msg": message, "type": kind}])
