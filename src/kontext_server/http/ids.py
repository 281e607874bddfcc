"""The server's own id formats, checked where a route reads an id from a path or query, before
the id is used or echoed anywhere (a header, a log line, a store query).

* request ids: canonical lower-case UUIDs, as ``QueueService`` makes them (version 7; older
  stores may hold other versions, so the version digit is not checked);
* upload tickets: ``<base64url claims>.<base64url HMAC-SHA256>`` (``uploads.UploadSigner``);
* file keys: ``files.base.is_valid_file_key``.

Request-id routes match only a well-formed id: their path parameter uses the ``request_id``
convertor registered here, so anything else never reaches a handler (``fal/routes.py``
answers it with the route family's 404).
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Path
from starlette.convertors import Convertor, register_url_convertor

__all__ = [
    "REQUEST_ID_CONVERTOR",
    "REQUEST_ID_PATTERN",
    "RequestIdPath",
    "is_request_id",
    "is_upload_ticket",
]

REQUEST_ID_PATTERN = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
REQUEST_ID_CONVERTOR = "request_id"  # use as "{request_id:request_id}" in a route path
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
# claims are a few hundred characters; the MAC is 32 bytes, 43 base64url characters unpadded
_UPLOAD_TICKET = re.compile(r"[A-Za-z0-9_-]{1,4096}\.[A-Za-z0-9_-]{43}")

# For the OpenAPI schema (and so the fuzzers): the format of the path parameter.
RequestIdPath = Annotated[str, Path(pattern=f"^{REQUEST_ID_PATTERN}$")]


def is_request_id(value: str) -> bool:
    return _REQUEST_ID.fullmatch(value) is not None


def is_upload_ticket(value: str) -> bool:
    return _UPLOAD_TICKET.fullmatch(value) is not None


class _RequestIdConvertor(Convertor[str]):
    regex = REQUEST_ID_PATTERN

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor(REQUEST_ID_CONVERTOR, _RequestIdConvertor())
