"""``LocalFileStore``: output images as files in one folder, served by the API at ``/files/``."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from kontext_server.files.base import StoredFile, is_valid_file_key

__all__ = ["LocalFileStore"]

_FILE_MODE = 0o644  # the API process (or a web server the operator points at it) reads them


class LocalFileStore:
    """Files under ``root`` (created if missing), one per key; keys may contain ``/``.

    ``put`` is atomic: a reader sees the whole file or none of it (temporary file + rename
    in the same folder). It does not fsync: like the job store (WAL, synchronous=NORMAL) it
    survives a crash of the process, not of the machine.

    Keys must pass ``is_valid_file_key``: ``put`` and ``delete`` raise ``ValueError`` for
    others; ``read`` and ``path`` (which see keys from URLs) answer ``None``.
    """

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self._root = root.resolve()

    @property
    def root(self) -> Path:
        return self._root

    def put(self, key: str, data: bytes, content_type: str) -> StoredFile:
        target = self._checked_path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            self._write_new_file(temporary, data)
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return StoredFile(key=key, size=len(data), content_type=content_type)

    @staticmethod
    def _write_new_file(path: Path, data: bytes) -> None:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)

    def url(self, key: str, base_url: str) -> str:
        """``{base_url}/files/{key}``; ``base_url`` is where the client reached this server."""
        return f"{base_url.rstrip('/')}/files/{key}"

    def read(self, key: str) -> bytes | None:
        path = self.path(key)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except FileNotFoundError:  # deleted in between
            return None

    def path(self, key: str) -> Path | None:
        """The file of ``key`` on disk, for streaming; ``None`` if the key is not valid, the
        file does not exist, or it lies outside the root (a symlink planted in the folder)."""
        if not is_valid_file_key(key):
            return None
        path = (self._root / key).resolve()
        if not path.is_relative_to(self._root) or not path.is_file():
            return None
        return path

    def delete(self, key: str) -> None:
        """Remove the file if it exists, and its folder once empty."""
        target = self._checked_path(key)
        target.unlink(missing_ok=True)
        folder = target.parent
        while folder != self._root:
            with contextlib.suppress(OSError):  # not empty (or already gone): keep it
                folder.rmdir()
            if folder.exists():
                break
            folder = folder.parent

    def _checked_path(self, key: str) -> Path:
        if not is_valid_file_key(key):
            raise ValueError(
                f"file key {key!r} is not allowed: use '/'-separated segments of letters,"
                " digits, '-', '_' and '.', none starting with '.', at most 512 characters"
            )
        return self._root / key
