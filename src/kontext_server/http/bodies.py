"""Reading a request body within a size cap: the one reader every skin uses (fal's submits and
uploads, BFL's and OpenAI's requests)."""

from __future__ import annotations

from fastapi import Request

__all__ = ["BodyTooLargeError", "read_capped_body"]


class BodyTooLargeError(Exception):
    """The request body is over ``max_bytes``. ``size`` is what was seen when it passed the
    cap: the declared ``Content-Length``, or the bytes received so far."""

    def __init__(self, max_bytes: int, size: int) -> None:
        super().__init__(f"The request body is larger than {max_bytes} bytes")
        self.max_bytes = max_bytes
        self.size = size


async def read_capped_body(request: Request, max_bytes: int) -> bytes:
    """The whole body; raises ``BodyTooLargeError`` as soon as it is over ``max_bytes``: first
    by its declared length, then while it streams in."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLargeError(max_bytes, int(declared))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise BodyTooLargeError(max_bytes, len(body))
    return bytes(body)
