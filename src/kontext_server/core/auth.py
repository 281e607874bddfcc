"""API keys: ``<key_id>:<secret>``, stored as the SHA-256 of the whole key.

Keys are high-entropy random strings, so one unsalted SHA-256 is enough to make a leaked
database useless for calling the API. ``Authenticator`` decides who a request is:

* with no active key in the store, authentication is off: any ``Authorization`` header is
  ignored (the official clients always send one) and only loopback clients are accepted,
  unless the operator said ``insecure_no_auth``;
* with keys, ``Authorization: Key <key>`` or ``Bearer <key>`` must name an active key.

A client (by address) that sends more than ``auth_max_failures`` wrong keys within
``auth_failure_window_s`` is refused (429 with ``Retry-After``) for ``auth_lockout_s``, even
with a right key: guessing keys costs the guesser time, not the server. Keys are never logged.

A key that was found is remembered for ``key_cache_s`` (``KONTEXT_AUTH_KEY_CACHE_S``, 5 s) by
its hash, at most ``KEY_CACHE_SIZE`` of them: a client polling its status is authenticated
without a store call, so a poll is one read of its job. The price is the revocation bound: a
key revoked by ``kontext-server keys revoke`` (another process) is refused by every API process
within ``key_cache_s``. Wrong keys are never cached (the throttle above counts them).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from kontext_server.config import Settings
from kontext_server.domain.errors import KontextError
from kontext_server.domain.jobs import ApiKey
from kontext_server.store.base import JobStore

__all__ = [
    "KEY_CACHE_SIZE",
    "AuthError",
    "Authenticator",
    "BadKeyThrottle",
    "KeyCache",
    "Principal",
    "create_api_key",
    "hash_api_key",
    "is_loopback_client",
    "key_from_authorization",
]

_SCHEMES = ("key", "bearer")
KEY_CACHE_SIZE = 10_000  # keys remembered at once; the least recently used go first


class AuthError(KontextError):
    """The request may not proceed; ``status_code`` is 401 (who are you), 403 (not here) or
    429 (too many wrong keys from this client: ``retry_after_s`` says when to come back)."""

    def __init__(self, status_code: int, detail: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.retry_after_s = retry_after_s


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


class BadKeyThrottle:
    """Counts wrong keys per client address and refuses a client that sent too many.

    More than ``max_failures`` failures within ``window_s`` lock the client out for
    ``lockout_s``. At most ``max_clients`` addresses are remembered (the oldest are forgotten
    first), so a flood of addresses cannot grow memory without bound. Thread-safe.
    """

    def __init__(
        self,
        *,
        max_failures: int = 10,
        window_s: float = 60.0,
        lockout_s: float = 60.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures, self.window_s, self.lockout_s = max_failures, window_s, lockout_s
        self._max_clients = max_clients
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._locked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> BadKeyThrottle:
        return cls(
            max_failures=settings.auth_max_failures,
            window_s=settings.auth_failure_window_s,
            lockout_s=settings.auth_lockout_s,
        )

    def check(self, client: str | None) -> None:
        """Raises ``AuthError(429)`` with ``retry_after_s`` while ``client`` is locked out."""
        with self._lock:
            until = self._locked_until.get(client or "")
            now = self._clock()
            if until is None or until <= now:
                self._locked_until.pop(client or "", None)
                return
        retry_after_s = max(1, int(until - now + 0.999))
        raise AuthError(
            429,
            f"Too many invalid API keys from this client (more than {self.max_failures} in "
            f"{self.window_s:g} s); retry after {retry_after_s} s with a valid key",
            retry_after_s=retry_after_s,
        )

    def record_failure(self, client: str | None) -> None:
        """Count one wrong key; the failure past ``max_failures`` starts the lockout."""
        name = client or ""
        with self._lock:
            now = self._clock()
            failures = self._failures.pop(name, None) or deque()
            failures.append(now)
            while failures and failures[0] <= now - self.window_s:
                failures.popleft()
            self._failures[name] = failures  # now the most recent
            if len(failures) > self.max_failures:
                self._locked_until[name] = now + self.lockout_s
                failures.clear()
            while len(self._failures) > self._max_clients:
                self._failures.popitem(last=False)


class KeyCache:
    """Keys found in the store, by hash, each trusted for ``ttl_s`` after it was read (LRU,
    at most ``max_entries``). Thread-safe. ``ttl_s`` 0 remembers nothing."""

    def __init__(
        self,
        ttl_s: float,
        *,
        max_entries: int = KEY_CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self._max_entries, self._clock = ttl_s, max_entries, clock
        self._entries: OrderedDict[str, tuple[ApiKey, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> ApiKey | None:
        with self._lock:
            entry = self._entries.get(key_hash)
            if entry is None:
                return None
            if entry[1] <= self._clock():
                del self._entries[key_hash]
                return None
            self._entries.move_to_end(key_hash)
            return entry[0]

    def put(self, key_hash: str, api_key: ApiKey) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            self._entries[key_hash] = (api_key, self._clock() + self.ttl_s)
            self._entries.move_to_end(key_hash)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class Authenticator:
    """Turns a request's ``Authorization`` header and client address into a ``Principal``."""

    def __init__(
        self,
        store: JobStore,
        *,
        insecure_no_auth: bool = False,
        throttle: BadKeyThrottle | None = None,
        keys: KeyCache | None = None,
    ) -> None:
        self._store = store
        self._insecure_no_auth = insecure_no_auth
        self.throttle = throttle or BadKeyThrottle()
        self.keys = keys if keys is not None else KeyCache(0)

    @classmethod
    def from_settings(cls, store: JobStore, settings: Settings) -> Authenticator:
        return cls(
            store,
            insecure_no_auth=settings.insecure_no_auth,
            throttle=BadKeyThrottle.from_settings(settings),
            keys=KeyCache(settings.auth_key_cache_s),
        )

    def authenticate(self, authorization: str | None, client_host: str | None) -> Principal:
        """Raises ``AuthError`` (401, 403 or 429) with a message that says what to do."""
        if not self._store.has_api_keys():
            return self._without_keys(client_host)
        self.throttle.check(client_host)
        key = _required_key(authorization)
        key_hash = hash_api_key(key)
        cached = self.keys.get(key_hash)
        api_key = cached or self._store.find_api_key(key_hash)
        # The lookup is by hash; confirming the id part in constant time costs nothing.
        if api_key is None or (":" in key and not _same(api_key.id, key.partition(":")[0])):
            self.throttle.record_failure(client_host)
            raise AuthError(401, "Invalid API key: it is unknown or has been revoked")
        if cached is None:  # trusted for key_cache_s from this read, never longer
            self.keys.put(key_hash, api_key)
        return Principal(owner=api_key.id)

    def authenticate_from_cache(
        self, authorization: str | None, client_host: str | None
    ) -> Principal | None:
        """``authenticate`` when it needs no store call, else ``None``: the caller then calls
        ``authenticate`` (off the event loop where the store waits on the network). No call
        is needed when no key exists and the store's cached answer says so, or when the key
        sent was found within ``key_cache_s``."""
        has_keys = self._store.known_has_api_keys()
        if has_keys is False:
            return self._without_keys(client_host)
        key = key_from_authorization(authorization)
        api_key = None if key is None else self.keys.get(hash_api_key(key))
        if api_key is None:
            return None
        self.throttle.check(client_host)  # a locked-out client is refused even with a right key
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


def _required_key(authorization: str | None) -> str:
    key = key_from_authorization(authorization)
    if key is None:
        raise AuthError(401, "Missing API key: send the header 'Authorization: Key <your API key>'")
    return key


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
