"""The ``FileStore`` protocol: where output images live and how clients reach them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["FileStore", "StoredFile"]


@dataclass(frozen=True, slots=True)
class StoredFile:
    key: str  # unguessable, includes the job's attempt: never overwrites a published result
    size: int
    content_type: str


class FileStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> StoredFile: ...

    def url(self, key: str, base_url: str) -> str:
        """A link a client can GET. ``base_url`` is where the client reached this server."""
        ...

    def read(self, key: str) -> bytes | None: ...

    def delete(self, key: str) -> None: ...
