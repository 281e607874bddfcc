"""API keys: fal's shape ``<key_id>:<secret>``, stored as the SHA-256 of the whole key.

Keys are high-entropy random strings, so one unsalted SHA-256 is enough to make a leaked
database useless for calling the API. ``Authenticator`` decides who a request is:

* with no active key in the store, authentication is off: any ``Authorization`` header is
  ignored (the official clients always send one) and only loopback clients are accepted,
  unless the operator said ``insecure_no_auth``;
* with keys, ``Authorization: Key <key>`` or ``Bearer <key>`` must name an active key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import uuid
from dataclasses import dataclass

from kontext_server.errors import KontextError
from kontext_server.jobs import ApiKey
from kontext_server.store.base import JobStore

__all__ = [
    "AuthError",
    "Authenticator",
    "Principal",
    "create_api_key",
    "hash_api_key",
    "is_loopback_client",
    "key_from_authorization",
]

_SCHEMES = ("key", "bearer")


class AuthError(KontextError):
    """The request may not proceed; ``status_code`` is 401 (who are you) or 403 (not here)."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: ``owner`` is the API key id, ``None`` when authentication is off."""

    owner: str | None


def hash_api_key(key: str) -> str:
    """The stored form of a key: SHA-256 hex of the whole ``key_id:secret`` string."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(store: JobStore, name: str) -> tuple[ApiKey, str]:
    """Create and store a new key; returns it and the full key, which is shown only once."""
    key_id = str(uuid.uuid4())
    key = f"{key_id}:{secrets.token_hex(32)}"
    return store.create_api_key(key_id, name, hash_api_key(key)), key


def key_from_authorization(header: str | None) -> str | None:
    """The key of ``Key <key>`` or ``Bearer <key>`` (scheme case-insensitive), else None."""
    if not header:
        return None
    scheme, _, key = header.strip().partition(" ")
    if scheme.lower() not in _SCHEMES or not key.strip():
        return None
    return key.strip()


def is_loopback_client(host: str | None) -> bool:
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class Authenticator:
    """Turns a request's ``Authorization`` header and client address into a ``Principal``."""

    def __init__(self, store: JobStore, *, insecure_no_auth: bool = False) -> None:
        self._store = store
        self._insecure_no_auth = insecure_no_auth

    def authenticate(self, authorization: str | None, client_host: str | None) -> Principal:
        """Raises ``AuthError`` (401 or 403) with a message that says what to do."""
        if not self._store.has_api_keys():
            return self._without_keys(client_host)
        key = key_from_authorization(authorization)
        if key is None:
            raise AuthError(
                401, "Missing API key: send the header 'Authorization: Key <your API key>'"
            )
        api_key = self._store.find_api_key(hash_api_key(key))
        # The lookup is by hash; confirming the id part in constant time costs nothing.
        if api_key is None or (":" in key and not _same(api_key.id, key.partition(":")[0])):
            raise AuthError(401, "Invalid API key: it is unknown or has been revoked")
        return Principal(owner=api_key.id)

    def _without_keys(self, client_host: str | None) -> Principal:
        if self._insecure_no_auth or is_loopback_client(client_host):
            return Principal(owner=None)
        raise AuthError(
            403,
            "Authentication is off (no API key exists), so this server only answers clients "
            "on this machine. Create a key with `kontext-server keys create --name NAME` and "
            "send it as 'Authorization: Key <key>'.",
        )


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
