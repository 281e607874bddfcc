"""A raw HTTP/1.1 exchange over a socket, for the fuzz tests: the request goes out exactly as
given (header bytes no HTTP library would send), and the answer is parsed with h11, so a
dropped connection or a malformed answer is seen as such instead of being smoothed over."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

import h11

__all__ = ["Answer", "NoAnswerError", "exchange"]


class NoAnswerError(AssertionError):
    """The server closed the connection, timed out or sent something that is not HTTP."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, bytes]  # lower-case names; the last value of a repeated header
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", b"").decode("latin-1")

    def is_json(self) -> bool:
        return self.content_type.startswith("application/json")

    def json(self) -> Any:
        return json.loads(self.body)


def exchange(
    address: tuple[str, int],
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
    *,
    timeout_s: float = 20.0,
) -> Answer:
    """Send one request (``Content-Length`` and ``Connection: close`` added) and read the
    whole answer; ``NoAnswerError`` if none arrives."""
    lines = [f"{method} ".encode() + target + b" HTTP/1.1", b"Host: " + _host(address)]
    lines += [name + b": " + value for name, value in headers]
    lines += [b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
    request = b"\r\n".join(lines) + b"\r\n\r\n" + body
    with socket.create_connection(address, timeout=timeout_s) as sock:
        try:
            sock.sendall(request)
        except OSError as exc:  # the server may answer (and close) before reading it all
            if not isinstance(exc, BrokenPipeError | ConnectionResetError):
                raise
        return _read_answer(sock, method)


def _host(address: tuple[str, int]) -> bytes:
    return f"{address[0]}:{address[1]}".encode()


def _read_answer(sock: socket.socket, method: str) -> Answer:
    client = h11.Connection(our_role=h11.CLIENT)
    # h11 must know what it asked, to know whether a body follows (HEAD has none).
    client.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    status: int | None = None
    headers: dict[str, bytes] = {}
    body = bytearray()
    while True:
        try:
            event = client.next_event()
        except h11.RemoteProtocolError as exc:
            raise NoAnswerError(f"the answer is not valid HTTP: {exc}") from exc
        if event is h11.NEED_DATA:
            try:
                data = sock.recv(65536)
            except TimeoutError as exc:
                raise NoAnswerError("no answer within the time limit") from exc
            except ConnectionResetError as exc:
                raise NoAnswerError("the connection was reset") from exc
            client.receive_data(data)
            if not data and status is None:
                raise NoAnswerError("the server closed the connection without an answer")
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {name.decode().lower(): value for name, value in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            assert status is not None
            return Answer(status, headers, bytes(body))
