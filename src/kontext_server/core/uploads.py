"""Uploads: files clients store on this server (the storage endpoints of PROTOCOL §10).

An upload is one file in the ``FileStore`` under an unguessable key::

    uploads/<yyyymmddhh>/<24 random url-safe characters>/<sanitised file name>

where ``<yyyymmddhh>`` (UTC) is the hour in which the upload *expires*: its folder is deleted
once that hour has passed (``UploadCleanupLoop``), so the key is the whole index and no
database row is needed. A client may ask for a shorter life (the skin reads it from the
request); never for a longer one than ``upload_retention_s``.

Who may upload is decided with signed, self-contained credentials (``UploadSigner``, HMAC-
SHA256 with a server secret), so any API process that shares the secret accepts them:

* a **CDN token** (``POST /rest/storage/auth/token``): bound to the API key that asked for it
  and valid for an hour, sent as ``Authorization: Bearer <token>`` with the bytes;
* an **upload ticket** (``POST /rest/storage/upload/initiate``): bound to the owner, the key
  and the content type, carried in the ``upload_url`` the client then ``PUT``s to.

Uploaded files are served like output images (local store: ``/files/<key>``; S3: presigned
links). ``read_own_file`` lets a worker read an image URL that points at this server's own
files from the file store directly (a loopback URL would be refused by the SSRF-safe fetcher).
The extension of the stored name decides the content type the file is served with, so only
harmless extensions are kept (images, text, JSON); anything else is stored as ``.bin``.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from kontext_server.config import Settings
from kontext_server.core.auth import AuthError
from kontext_server.core.periodic import PeriodicTask
from kontext_server.domain.errors import ImageFetchError, InputError
from kontext_server.files.base import FileStore, StoredFile, content_type_for_key

__all__ = [
    "UPLOAD_PREFIX",
    "UPLOAD_SECRET_FILE",
    "PreparedUpload",
    "UploadCleanupLoop",
    "UploadService",
    "UploadSigner",
    "UploadToken",
    "UploadTooLargeError",
    "expiry_folder",
    "load_or_create_upload_secret",
    "read_own_file",
    "upload_file_name",
]

log = logging.getLogger(__name__)

UPLOAD_PREFIX = "uploads"
UPLOAD_SECRET_FILE = "upload-secret.key"  # under Settings.data_dir
TOKEN_TTL_S = 3600.0  # CDN tokens and upload tickets; clients ask for a new one when it ends
_SECRET_BYTES = 32
_RANDOM_BYTES = 18  # 144 bits, 24 URL-safe characters, as output file keys
_FOLDER_FORMAT = "%Y%m%d%H"
_FOLDER_PATTERN = re.compile(r"[0-9]{10}")
_HOUR_S = 3600
_MAX_STEM_CHARS = 64
_FILES_SEGMENT = "/files/"
_MAX_FILES_SEGMENTS = 3  # candidate keys tried per URL (a root path may contain /files/ too)
# Extensions kept from the client's file name: each is served with a content type a browser
# will not run as a page (no html, svg, js). Anything else is stored as ``.bin``.
_SAFE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "png", "webp", "gif", "avif", "bmp", "tif", "tiff", "heic", "heif"}
    | {"txt", "json", "bin"}
)
_EXTENSION_FOR_CONTENT_TYPE = {
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/png": "png",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/avif": "avif",
    "image/bmp": "bmp",
    "image/tiff": "tiff",
    "image/heic": "heic",
    "image/heif": "heif",
    "text/plain": "txt",
    "application/json": "json",
}


class UploadTooLargeError(InputError):
    """An upload larger than ``max_upload_bytes`` (answered 413)."""

    error_type = "file_too_large"


# --- the secret and the signer -----------------------------------------------------------------


def load_or_create_upload_secret(path: Path) -> bytes:
    """The secret at ``path``, created (32 random bytes, hex, mode 0600) if missing. Safe
    when several processes start at once: the first file linked into place wins."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_hex(_SECRET_BYTES))
            with contextlib.suppress(FileExistsError):  # another process won: use its secret
                os.link(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    return path.read_text().strip().encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class UploadSigner:
    """Signs and checks small JSON claims: ``<base64url(json)>.<base64url(hmac)>``.

    ``purpose`` is part of what is signed, so a CDN token is never accepted as an upload
    ticket or the other way round. Every claim set carries its expiry (``x``, unix seconds).
    """

    def __init__(self, secret: bytes, *, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 16:
            raise ValueError("the upload secret must be at least 16 bytes")
        self._secret = secret
        self._clock = clock

    def sign(self, purpose: str, claims: dict[str, Any], ttl_s: float) -> tuple[str, int]:
        """A credential for ``claims`` valid ``ttl_s``; returns it and its expiry (unix s)."""
        expires_at = int(self._clock() + ttl_s)
        payload = _b64(json.dumps({**claims, "x": expires_at}, separators=(",", ":")).encode())
        return f"{payload}.{self._mac(purpose, payload)}", expires_at

    def verify(self, purpose: str, credential: str) -> dict[str, Any]:
        """The claims of a valid, unexpired credential; ``AuthError`` (401) otherwise."""
        payload, _, mac = credential.partition(".")
        expected = self._mac(purpose, payload)
        if not payload or not hmac.compare_digest(mac.encode(), expected.encode()):
            raise AuthError(401, f"Invalid {purpose}: it was not issued by this server")
        try:
            claims: dict[str, Any] = json.loads(_unb64(payload))
        except (ValueError, binascii.Error) as exc:  # signed by us, so this is a bug
            raise AuthError(401, f"Invalid {purpose}: unreadable claims") from exc
        if claims.get("x", 0) <= self._clock():
            raise AuthError(401, f"Expired {purpose}: ask for a new one")
        return claims

    def _mac(self, purpose: str, payload: str) -> str:
        message = f"{purpose}\n{payload}".encode()
        return _b64(hmac.new(self._secret, message, hashlib.sha256).digest())


# --- keys and names ----------------------------------------------------------------------------


def expiry_folder(expires_at_s: float) -> str:
    """The ``yyyymmddhh`` (UTC) folder of an upload expiring at ``expires_at_s``."""
    return time.strftime(_FOLDER_FORMAT, time.gmtime(expires_at_s))


def _folder_end_s(folder: str) -> float | None:
    """When the hour named by ``folder`` ends (its uploads may go), or None if not a folder."""
    if not _FOLDER_PATTERN.fullmatch(folder):
        return None
    try:
        start = calendar.timegm(time.strptime(folder, _FOLDER_FORMAT))
    except ValueError:
        return None
    return float(start + _HOUR_S)


def upload_file_name(file_name: str | None, content_type: str) -> str:
    """A safe last key segment from the client's file name: letters, digits, ``-`` and
    ``_`` (at most 64), and an extension from ``_SAFE_EXTENSIONS`` (else one from the
    content type, else ``bin``). ``"../My Photo.PNG"`` -> ``"My-Photo.png"``."""
    base = re.split(r"[/\\]", file_name or "")[-1]
    stem, dot, extension = base.rpartition(".")
    if not dot:
        stem, extension = base, ""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-")[:_MAX_STEM_CHARS] or "upload"
    extension = extension.lower()
    if extension not in _SAFE_EXTENSIONS:
        media_type = content_type.split(";", 1)[0].strip().lower()
        extension = _EXTENSION_FOR_CONTENT_TYPE.get(media_type, "bin")
    return f"{stem}.{extension}"


# --- the service -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UploadToken:
    token: str
    expires_at_s: int


@dataclass(frozen=True, slots=True)
class PreparedUpload:
    """Where an initiated upload will be stored, and the ticket that allows the ``PUT``."""

    key: str
    ticket: str


class UploadService:
    """Issues upload credentials and stores uploaded bytes. ``owner`` is an API key id, or
    ``None`` when authentication is off."""

    def __init__(
        self,
        files: FileStore,
        signer: UploadSigner,
        *,
        max_bytes: int,
        retention_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.files = files
        self.max_bytes = max_bytes
        self.retention_s = retention_s
        self._signer = signer
        self._clock = clock

    @classmethod
    def from_settings(
        cls, settings: Settings, files: FileStore, *, clock: Callable[[], float] = time.time
    ) -> UploadService:
        """The secret is ``upload_secret`` or the file ``upload-secret.key`` in the data dir."""
        secret = (
            settings.upload_secret.get_secret_value().encode()
            if settings.upload_secret is not None
            else load_or_create_upload_secret(settings.data_dir / UPLOAD_SECRET_FILE)
        )
        return cls(
            files,
            UploadSigner(secret, clock=clock),
            max_bytes=settings.max_upload_bytes,
            retention_s=settings.upload_retention_s,
            clock=clock,
        )

    def issue_token(self, owner: str | None) -> UploadToken:
        token, expires_at = self._signer.sign("upload token", {"o": owner}, TOKEN_TTL_S)
        return UploadToken(token, expires_at)

    def token_owner(self, token: str) -> str | None:
        """The owner a CDN token was issued to; ``AuthError`` if invalid or expired."""
        owner = self._signer.verify("upload token", token).get("o")
        return owner if isinstance(owner, str) else None

    def new_key(self, file_name: str | None, content_type: str, ttl_s: float | None) -> str:
        """A fresh key for an upload that lives ``ttl_s`` (capped at the retention)."""
        life_s = self.retention_s if ttl_s is None else min(ttl_s, self.retention_s)
        folder = expiry_folder(self._clock() + life_s)
        random_part = secrets.token_urlsafe(_RANDOM_BYTES)
        return f"{UPLOAD_PREFIX}/{folder}/{random_part}/{upload_file_name(file_name, content_type)}"

    def prepare(
        self, owner: str | None, file_name: str | None, content_type: str, ttl_s: float | None
    ) -> PreparedUpload:
        """Choose the key of an upload the client will ``PUT`` later, and sign its ticket."""
        key = self.new_key(file_name, content_type, ttl_s)
        ticket, _ = self._signer.sign("upload URL", {"o": owner, "k": key}, TOKEN_TTL_S)
        return PreparedUpload(key, ticket)

    def ticket_key(self, ticket: str) -> str:
        """The key an upload ticket allows writing; ``AuthError`` if invalid or expired."""
        key = self._signer.verify("upload URL", ticket).get("k")
        if not isinstance(key, str):
            raise AuthError(401, "Invalid upload URL: it names no file")
        return key

    def check_size(self, size: int) -> None:
        """Raises ``UploadTooLargeError`` past ``max_bytes``."""
        if size > self.max_bytes:
            raise UploadTooLargeError(
                f"The upload is larger than this server's limit of {self.max_bytes:,} bytes "
                f"({size:,} bytes or more were sent); the operator sets max_upload_bytes"
            )

    def store(self, key: str, data: bytes) -> StoredFile:
        """Write the bytes; the content type follows the key's (safe) extension."""
        self.check_size(len(data))
        return self.files.put(key, data, content_type_for_key(key))


# --- cleanup -----------------------------------------------------------------------------------


@runtime_checkable
class _LocalRoot(Protocol):
    """A file store whose keys are paths under one folder (``LocalFileStore``)."""

    @property
    def root(self) -> Path: ...


class UploadCleanupLoop:
    """Deletes expired upload folders every ``interval_s`` on a daemon thread (first pass at
    ``start()``); ``run_once()`` runs one pass in the caller's thread.

    Only stores with local folders can be listed; for others (S3) the loop logs once that
    expiry is the bucket's job (a lifecycle rule on ``uploads/``) and does nothing."""

    def __init__(
        self,
        files: FileStore,
        *,
        interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._files = files
        self._clock = clock
        self._task = PeriodicTask("upload-cleanup", self.run_once, interval_s)

    def run_once(self) -> int:
        """Delete the files of every upload folder whose hour has passed; returns how many."""
        if not isinstance(self._files, _LocalRoot):
            return 0
        deleted = 0
        for key in self._expired_keys(self._files.root / UPLOAD_PREFIX):
            try:
                self._files.delete(key)
                deleted += 1
            except (OSError, ValueError):  # one bad file must not keep the others
                log.exception("uploads: cannot delete expired upload %s", key)
        if deleted:
            log.info("uploads: deleted %d expired upload(s)", deleted)
        return deleted

    def _expired_keys(self, uploads: Path) -> Iterator[str]:
        now = self._clock()
        with contextlib.suppress(FileNotFoundError):
            for folder in sorted(uploads.iterdir()):
                end_s = _folder_end_s(folder.name)
                if end_s is None or end_s > now:
                    continue
                for path in folder.rglob("*"):
                    if path.is_file() and not path.name.startswith("."):
                        yield f"{UPLOAD_PREFIX}/{path.relative_to(uploads).as_posix()}"

    def start(self) -> None:
        if not isinstance(self._files, _LocalRoot):
            log.info(
                "uploads: this file store cannot be listed, so expired uploads are not deleted "
                "by the server; add a lifecycle rule expiring '%s/' to the bucket",
                UPLOAD_PREFIX,
            )
            return
        self._task.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._task.stop(timeout_s)

    @asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """Runs the loop while an ASGI app (or a router of one) runs."""
        self.start()
        try:
            yield
        finally:
            self.stop()


# --- the worker's side -------------------------------------------------------------------------


def read_own_file(source: str, files: FileStore, *, max_bytes: int) -> bytes | None:
    """The bytes behind ``source`` when it is a link to one of this server's own files
    (``http(s)://<any host>/<root path>/files/<key>`` with ``key`` in ``files``: uploads and
    earlier outputs), else ``None`` (fetch it over the network as usual).

    The host is not compared: the server cannot know every name it is reached by, and keys
    are unguessable, so naming one proves the caller could download it anyway. Raises
    ``ImageFetchError`` for a file larger than ``max_bytes``."""
    if not source.startswith(("http://", "https://")):
        return None
    path = urlsplit(source).path
    for key in _candidate_keys(path):
        data = files.read(key)
        if data is None:
            continue
        if len(data) > max_bytes:
            raise ImageFetchError(
                f"image {source} is {len(data):,} bytes; at most {max_bytes:,} are allowed"
            )
        return data
    return None


def _candidate_keys(path: str) -> Iterator[str]:
    start = 0
    for _ in range(_MAX_FILES_SEGMENTS):
        index = path.find(_FILES_SEGMENT, start)
        if index < 0:
            return
        start = index + len(_FILES_SEGMENT)
        yield unquote(path[start:])
