"""Ed25519 signatures for webhooks, as fal signs them (PROTOCOL.md §9).

A receiver verifies ``X-Fal-Webhook-Signature`` (hex) over the bytes::

    request_id \\n user_id \\n timestamp \\n sha256_hex(body)

with a public key from ``/.well-known/jwks.json`` (``kty: OKP, crv: Ed25519``). The private
key lives in one PEM file in the data dir, created on first use with mode 0600 and reused
after restarts, so that receivers keep trusting the same key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kontext_server.domain.errors import ConfigError

__all__ = ["SIGNATURE_HEADERS", "WebhookSigner", "signed_message"]

log = logging.getLogger(__name__)

SIGNATURE_HEADERS = (
    "X-Fal-Webhook-Request-Id",
    "X-Fal-Webhook-User-Id",
    "X-Fal-Webhook-Timestamp",
    "X-Fal-Webhook-Signature",
)


def signed_message(request_id: str, user_id: str, timestamp: int, body: bytes) -> bytes:
    """The exact bytes a webhook signature covers."""
    parts = [request_id, user_id, str(timestamp), hashlib.sha256(body).hexdigest()]
    return "\n".join(parts).encode("utf-8")


def _base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class WebhookSigner:
    """Signs webhook bodies with one Ed25519 key and publishes its public half as a JWKS."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        raw_public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._x = _base64url(raw_public)
        self.kid = self._thumbprint(self._x)

    @classmethod
    def load_or_create(cls, path: Path) -> WebhookSigner:
        """The key at ``path`` (PEM, PKCS#8), created (mode 0600) if missing.

        Safe when several processes start at once: the key is written to a private
        temporary file and linked into place, so everyone ends up with the winner's key.
        Raises ConfigError when the file exists but is not an Ed25519 private key.
        """
        if not path.exists():
            _create_key_file(path)
        return cls(_read_key_file(path))

    @property
    def public_key_b64url(self) -> str:
        """The raw 32-byte public key, base64url without padding (the JWK ``x``)."""
        return self._x

    def headers(
        self, request_id: str, user_id: str, body: bytes, timestamp: int | None = None
    ) -> dict[str, str]:
        """The four ``X-Fal-Webhook-*`` headers for ``body``; ``timestamp`` defaults to now."""
        timestamp = int(time.time()) if timestamp is None else timestamp
        message = signed_message(request_id, user_id, timestamp, body)
        return dict(
            zip(
                SIGNATURE_HEADERS,
                (request_id, user_id, str(timestamp), self._private_key.sign(message).hex()),
                strict=True,
            )
        )

    def jwks(self) -> dict[str, Any]:
        """``{"keys": [...]}`` with the one public key, as ``/.well-known/jwks.json`` serves."""
        key = {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": self._x,
            "kid": self.kid,
            "use": "sig",
            "alg": "EdDSA",
        }
        return {"keys": [key]}

    @staticmethod
    def _thumbprint(x: str) -> str:
        # RFC 7638: SHA-256 over the required members, sorted, without whitespace.
        canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
        return _base64url(hashlib.sha256(canonical.encode("ascii")).digest())


def _create_key_file(path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
        # link() fails if the key appeared meanwhile: another process won, keep its key.
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
            log.info("created the webhook signing key %s", path)
    finally:
        temporary.unlink(missing_ok=True)


def _read_key_file(path: Path) -> Ed25519PrivateKey:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("webhook signing key %s is readable by others: chmod 600 it", path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"cannot read the webhook signing key {path} ({exc}); delete it to create a new "
            "one (receivers then need the new /.well-known/jwks.json)"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            f"the webhook signing key {path} is not an Ed25519 key; delete it to create one"
        )
    return key
