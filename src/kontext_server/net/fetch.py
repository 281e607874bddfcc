"""SSRF-safe fetching of input images and posting of webhooks, plus ``data:`` URIs.

Every request made for a caller-supplied URL goes through :class:`SafeFetcher`:

1. only ``http`` and ``https``;
2. the host is resolved once, and every address it resolves to must be global (not
   loopback, private, link-local / cloud metadata, multicast, reserved, unspecified, CGNAT,
   unique-local, site-local; IPv4 addresses hidden in IPv4-mapped, NAT64 and 6to4 IPv6
   forms are unwrapped and checked) unless the operator allow-listed the host or address;
3. the connection goes to *that* checked address: a network backend pinned to it refuses
   to connect anywhere else, so there is no second DNS lookup to rebind, while the Host
   header, TLS SNI and certificate verification stay on the URL's own name;
4. only ports in ``allow_ports`` (unless the host is allow-listed);
5. redirects are followed by hand and every hop is checked again (``post`` follows none);
6. ``timeout_s`` caps the whole operation (DNS, connect, TLS, every read and write), not
   each read; ``max_bytes`` caps the body as it streams, whatever ``Content-Length`` says.

Failures raise :class:`~kontext_server.domain.errors.ImageFetchError` with a message that says
what was wrong and what is allowed; refusals by the address policy raise its subclass
:class:`URLNotAllowedError` (retrying those is pointless).
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import contextlib
import functools
import ipaddress
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from kontext_server import __version__
from kontext_server.domain.errors import ImageDecodeError, ImageFetchError, InputError

__all__ = [
    "ALLOWED_DATA_URI_MIME_TYPES",
    "MAX_URL_CHARS",
    "Resolver",
    "SafeFetcher",
    "URLNotAllowedError",
    "check_image_source",
    "decode_data_uri",
    "literal_addresses",
    "load_image_bytes",
    "parsed_url",
    "system_resolver",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

Resolver = Callable[[str, int], Sequence[str]]
"""``(host, port) -> addresses``: how a host name becomes IP address strings."""

# The decoder checks the real format of the bytes; these only catch obvious mistakes early.
# application/octet-stream is accepted because some clients label uploads that way.
ALLOWED_DATA_URI_MIME_TYPES = (
    "image/jpeg",
    "image/jpg",
    "image/png",
    "image/webp",
    "image/gif",
    "image/avif",
    "image/bmp",
    "application/octet-stream",
)
MAX_URL_CHARS = 8192
# Parsed URLs kept (httpx.URL is immutable): a submit's schema check and its precheck parse
# the same URLs (~9 µs each with httpx), and clients often send the same reference image.
_PARSED_URLS_KEPT = 256
# No IPv4 spelling (dotted, decimal, octal, hex: what inet_aton takes) has any other character.
_NOT_IN_IPV4_SPELLINGS = re.compile(r"[^0-9a-fA-FxX.]")

_ALLOW_HOSTS_HINT = (
    "only public addresses can be fetched; an operator can allow private hosts with "
    "KONTEXT_FETCH_ALLOW_HOSTS"
)
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_USER_AGENT = f"kontext-server/{__version__}"
_SHOWN_URL_CHARS = 200
_MIB = 1024 * 1024


# --- address policy ------------------------------------------------------------------------

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 form carries (mapped, NAT64, 6to4), with the form's name."""
    if address.ipv4_mapped is not None:
        return "an IPv4-mapped form", address.ipv4_mapped
    if address in _NAT64:
        return "a NAT64 form", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return "a 6to4 form", address.sixtofour
    return None


def _non_global_reason(address: IPAddress) -> str | None:
    """Why ``address`` must not be fetched, as a phrase ("a loopback address"), or None."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            form, inner = embedded
            inner_reason = _non_global_reason(inner)
            return None if inner_reason is None else f"{form} of {inner}, {inner_reason}"
    # Specific kinds first: most of them are also "private" or "reserved" to ipaddress.
    checks: list[tuple[bool, str]] = [
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address (where cloud metadata services live)"),
        (address.is_multicast, "a multicast address"),
        (address in _CGNAT, "a shared (CGNAT) address"),
        (address in _UNIQUE_LOCAL, "a unique-local (private) address"),
        (address in _NAT64_LOCAL_USE, "a local-use NAT64 address"),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local,
         "a site-local address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "not a globally routable address"),
    ]  # fmt: skip
    return next((reason for matched, reason in checks if matched), None)


@dataclass(frozen=True, slots=True)
class _AllowList:
    """The operator's ``allow_hosts``: exact host names, ``*.suffix`` wildcards, IPs/CIDRs."""

    hostnames: frozenset[str]
    suffixes: tuple[str, ...]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> _AllowList:
        hostnames: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().strip("[]").lower().rstrip(".")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if entry.startswith("*."):
                    suffixes.append(entry[1:])
                else:
                    hostnames.add(entry)
        return cls(frozenset(hostnames), tuple(suffixes), tuple(networks))

    def has_host(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        return name in self.hostnames or name.endswith(self.suffixes)

    def has_address(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


@dataclass(frozen=True, slots=True)
class _Pin:
    """A checked destination: connect to ``addresses`` (in order) for ``host:port`` only."""

    host: str
    port: int
    addresses: tuple[str, ...]


class URLNotAllowedError(ImageFetchError):
    """The URL (or a redirect hop) is refused by the address policy: scheme, address, port.

    The same URL will be refused again (until the operator changes the allow-lists).
    """


class _Refused(Exception):
    """Internal: a URL failed the policy; the message is the reason, without the URL."""


# --- time and resolution -------------------------------------------------------------------


class _Deadline:
    """One deadline for a whole operation; every network wait is clamped to what is left."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._ends_at = time.monotonic() + timeout_s

    def remaining_s(self) -> float:
        return self._ends_at - time.monotonic()

    @property
    def passed(self) -> bool:
        return self.remaining_s() <= 0

    def clamp(self, timeout_s: float | None, on_passed: type[Exception]) -> float:
        remaining_s = self.remaining_s()
        if remaining_s <= 0:
            raise on_passed(f"the {self.timeout_s:g} s deadline has passed")
        return remaining_s if timeout_s is None else min(timeout_s, remaining_s)


@functools.lru_cache(maxsize=_PARSED_URLS_KEPT)
def parsed_url(url: str) -> httpx.URL:
    """``httpx.URL(url)``, remembered for the last few hundred URLs (raises ``InvalidURL``
    or ``TypeError`` like it; failures are not remembered)."""
    return httpx.URL(url)


def literal_addresses(host: str, port: int) -> list[str] | None:
    """The addresses of a host that needs no DNS (an address literal in any spelling the
    system accepts, or ``localhost``); ``None`` for a name that must be resolved."""
    if host.lower().rstrip(".") == "localhost" or host.lower().endswith(".localhost"):
        return ["127.0.0.1", "::1"]
    if ":" not in host and _NOT_IN_IPV4_SPELLINGS.search(host):
        return None  # a name (e.g. "v3.fal.media"): no need to ask getaddrinfo
    if ":" in host:
        # An IPv6 literal with a zone id ("[fe80::1%25lo]"): the address before the zone is
        # what gets checked (getaddrinfo refuses a zone naming no interface of this machine).
        host = host.split("%", 1)[0]
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
        )
    except (socket.gaierror, UnicodeError):
        return None
    return sorted({str(info[4][0]) for info in infos})


def system_resolver(host: str, port: int) -> list[str]:
    """The system's resolver (``getaddrinfo``): every TCP address of ``host``."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


# getaddrinfo has no timeout of its own; a small pool lets us stop waiting at the deadline.
_RESOLVER_POOL = concurrent.futures.ThreadPoolExecutor(
    max_workers=4, thread_name_prefix="kontext-resolve"
)


def _resolve_within(resolver: Resolver, host: str, port: int, deadline: _Deadline) -> list[str]:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [host]  # an IP literal: nothing to look up
    future = _RESOLVER_POOL.submit(resolver, host, port)
    try:
        addresses = future.result(timeout=max(deadline.remaining_s(), 0.0))
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"resolving {host} took too long") from None
    return list(dict.fromkeys(addresses))  # de-duplicated, order kept


# --- a transport that only connects to the checked address ---------------------------------


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every read and write stops at the operation's deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._deadline.clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._deadline.clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        timeout = self._deadline.clamp(timeout, httpcore.ConnectTimeout)
        tls = self._inner.start_tls(ssl_context, server_hostname, timeout)
        return _DeadlineStream(tls, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects ``pin.host:pin.port`` to the pinned addresses and refuses everything else."""

    def __init__(self, pin: _Pin, deadline: _Deadline) -> None:
        self._pin = pin
        self._deadline = deadline
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        if (host, port) != (self._pin.host, self._pin.port):
            raise httpcore.ConnectError(f"refusing to connect to unchecked {host}:{port}")
        error: httpcore.ConnectError | None = None
        for address in self._pin.addresses:
            try:
                stream = self._inner.connect_tcp(
                    address,
                    port,
                    timeout=self._deadline.clamp(timeout, httpcore.ConnectTimeout),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                error = exc  # try the next checked address
            else:
                return _DeadlineStream(stream, self._deadline)
        raise error or httpcore.ConnectError(f"{host} has no address to connect to")


_CORE_TRANSPORT_ERRORS = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.ProxyError,
    httpcore.UnsupportedProtocol,
)


@contextlib.contextmanager
def _core_errors_as_httpx() -> Iterator[None]:
    try:
        yield
    except httpcore.TimeoutException as exc:
        raise httpx.TimeoutException(str(exc)) from exc
    except _CORE_TRANSPORT_ERRORS as exc:
        raise httpx.TransportError(str(exc)) from exc


class _CoreResponseStream(httpx.SyncByteStream):
    def __init__(self, inner: Iterable[bytes]) -> None:
        self._inner = inner

    def __iter__(self) -> Iterator[bytes]:
        with _core_errors_as_httpx():
            yield from self._inner

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


class _PinnedTransport(httpx.BaseTransport):
    """httpx's transport seam over an httpcore pool whose network backend is pinned."""

    def __init__(self, backend: httpcore.NetworkBackend, ssl_context: ssl.SSLContext) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context, network_backend=backend, max_connections=1
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _core_errors_as_httpx():
            core_response = self._pool.handle_request(core_request)
        assert isinstance(core_response.stream, Iterable)
        return httpx.Response(
            status_code=core_response.status,
            headers=core_response.headers,
            stream=_CoreResponseStream(core_response.stream),
            extensions=core_response.extensions,
        )

    def close(self) -> None:
        self._pool.close()


# --- the fetcher ---------------------------------------------------------------------------


def _shown(url: str | httpx.URL) -> str:
    """A URL short enough for an error message."""
    text = str(url)
    return text if len(text) <= _SHOWN_URL_CHARS else text[: _SHOWN_URL_CHARS - 1] + "…"


def _is_redirect(original: str, hop: httpx.URL) -> bool:
    """Whether ``hop`` is a redirect target rather than the (parsed) URL the caller gave."""
    return hop != httpx.URL(original)


def _format_bytes(count: int) -> str:
    if count >= _MIB:
        return f"{count / _MIB:.1f}".removesuffix(".0") + " MiB"
    if count >= 1024:
        return f"{count / 1024:.1f}".removesuffix(".0") + " KiB"
    return f"{count} bytes"


class SafeFetcher:
    """Fetches caller-supplied URLs without letting them reach private networks.

    ``allow_hosts``: host names (``images.internal``, ``*.corp.example``) or IPs/CIDRs
    (``10.0.0.0/8``) the operator allows even though they are not public; an allowed host may
    use any port. ``allow_ports``: the ports other hosts may use. ``timeout_s`` caps a whole
    :meth:`fetch` (all hops); ``max_bytes`` caps the body. ``resolver`` and ``ssl_context``
    exist for tests (a fake DNS, a private CA). Thread-safe: nothing is shared between calls.
    """

    def __init__(
        self,
        *,
        allow_hosts: Sequence[str],
        allow_ports: Sequence[int],
        timeout_s: float,
        max_bytes: int,
        max_redirects: int = 5,
        resolver: Resolver = system_resolver,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.allow_ports = tuple(allow_ports)
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self._allowed = _AllowList.parse(allow_hosts)
        self._resolver = resolver
        # httpx's default: certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR when set.
        self._ssl_context = ssl_context or httpx.create_ssl_context()

    # --- public ------------------------------------------------------------------------------

    def fetch(
        self,
        url: str,
        *,
        max_bytes: int | None = None,
        label: str = "image_url",
        image_only: bool = False,
    ) -> bytes:
        """GET ``url`` and return its body, following up to ``max_redirects`` checked hops.

        ``max_bytes`` overrides the fetcher's cap for this call; ``label`` names the URL in
        error messages; ``image_only`` refuses a body whose declared ``Content-Type`` is not
        an image (``image/*``, a generic binary type, or none), before reading it. Raises
        URLNotAllowedError when the address policy refuses the URL or a hop, ImageFetchError
        on a network error, HTTP status >= 300 (after redirects), wrong content type, time or
        byte cap.
        """
        limit_bytes = self.max_bytes if max_bytes is None else max_bytes
        deadline = _Deadline(self.timeout_s)
        hop = self._parse(url, label)
        for _ in range(self.max_redirects + 1):
            with self._hop(url, hop, label, deadline) as client:
                request = client.build_request("GET", hop, headers=self._headers())
                response = client.send(request, stream=True)
                with contextlib.closing(response):
                    location = response.headers.get("location")
                    if response.status_code not in _REDIRECT_STATUSES or not location:
                        self._raise_for_status(url, hop, response)
                        if image_only:
                            _check_image_content_type(url, label, response)
                        return self._read_capped(url, label, response, limit_bytes)
            hop = self._next_hop(url, hop, location)
        raise ImageFetchError(
            f"fetching {_shown(url)} failed: more than {self.max_redirects} redirects"
        )

    def post(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        timeout_s: float,
        *,
        label: str = "webhook URL",
    ) -> int:
        """POST ``body`` to ``url`` (same address checks, no redirects); the status code.

        The response body is not read. Raises URLNotAllowedError when the address policy
        refuses the URL, ImageFetchError on a network error or when ``timeout_s`` passes.
        """
        deadline = _Deadline(timeout_s)
        target = self._parse(url, label)
        with self._hop(url, target, label, deadline) as client:
            request = client.build_request(
                "POST", target, content=body, headers={**self._headers(), **headers}
            )
            response = client.send(request, stream=True)
            response.close()
            return response.status_code

    # --- one hop -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _hop(
        self, original: str, hop: httpx.URL, label: str, deadline: _Deadline
    ) -> Iterator[httpx.Client]:
        """A client that can reach only ``hop``'s checked address; maps network errors."""
        pin = self._check(original, hop, label, deadline)
        transport = _PinnedTransport(_PinnedBackend(pin, deadline), self._ssl_context)
        try:
            with httpx.Client(
                transport=transport, trust_env=False, follow_redirects=False, timeout=None
            ) as client:
                yield client
        except httpx.HTTPError as exc:
            raise self._network_error(original, hop, exc, deadline) from exc

    def precheck(self, url: str, *, label: str = "image_url") -> None:
        """The checks that need no DNS, for submit time: the scheme, the port, and hosts that
        are address literals in any spelling (``127.1``, ``2130706433``, ``[::1]``) or
        ``localhost``. Names are checked again, resolved, when fetched or delivered to.
        Raises ``URLNotAllowedError``."""
        hop = self._parse(url, label)
        try:
            if hop.scheme not in _DEFAULT_PORTS:
                raise _Refused(
                    f"only http and https URLs can be fetched, not {hop.scheme or 'scheme-less'}"
                    ": URLs"
                )
            host = hop.raw_host.decode("ascii")
            port = hop.port or _DEFAULT_PORTS[hop.scheme]
            addresses = literal_addresses(host, port)
            host_allowed = self._allowed.has_host(host) or (
                addresses is not None and self._check_addresses(hop.host, addresses)
            )
            if not host_allowed and port not in self.allow_ports:
                raise _Refused(self._port_refusal(port))
        except _Refused as refusal:
            raise URLNotAllowedError(f"{label} {_shown(url)} is not allowed: {refusal}") from None

    def _port_refusal(self, port: int) -> str:
        ports = ", ".join(str(p) for p in self.allow_ports) or "none"
        return (
            f"port {port} is not allowed (allowed ports: {ports}; an operator can allow "
            "more with KONTEXT_FETCH_ALLOW_PORTS or allow the host with "
            "KONTEXT_FETCH_ALLOW_HOSTS)"
        )

    def _check(self, original: str, hop: httpx.URL, label: str, deadline: _Deadline) -> _Pin:
        try:
            return self._pin(hop, deadline)
        except _Refused as refusal:
            via = f"it redirects to {_shown(hop)} and " if _is_redirect(original, hop) else ""
            raise URLNotAllowedError(
                f"{label} {_shown(original)} is not allowed: {via}{refusal}"
            ) from None
        except (OSError, UnicodeError) as exc:  # resolution failed or timed out
            if deadline.passed:
                raise self._too_slow(original, deadline.timeout_s) from exc
            raise ImageFetchError(
                f"fetching {_shown(original)} failed: cannot resolve host {hop.host!r} ({exc})"
            ) from exc

    def _pin(self, url: httpx.URL, deadline: _Deadline) -> _Pin:
        """Apply the policy to one URL; raises _Refused with the reason."""
        if url.scheme not in _DEFAULT_PORTS:
            raise _Refused(
                f"only http and https URLs can be fetched, not {url.scheme or 'scheme-less'}: URLs"
            )
        host = url.raw_host.decode("ascii")
        if not host:
            raise _Refused("the URL has no host")
        port = url.port or _DEFAULT_PORTS[url.scheme]
        addresses = _resolve_within(self._resolver, host, port, deadline)
        if not addresses:
            raise OSError(f"no address for {host}")
        host_allowed = self._allowed.has_host(host)
        if not host_allowed:
            host_allowed = self._check_addresses(url.host, addresses)
        if not host_allowed and port not in self.allow_ports:
            raise _Refused(self._port_refusal(port))
        return _Pin(host, port, tuple(addresses))

    def _check_addresses(self, host: str, addresses: Sequence[str]) -> bool:
        """Raise _Refused unless every address is global or allowed; True if all allowed."""
        all_allowed = True
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 scope id
            if self._allowed.has_address(address):
                continue
            all_allowed = False
            reason = _non_global_reason(address)
            if reason is not None:
                what = f"{text} is" if host == text else f"{host} resolves to {text},"
                raise _Refused(f"{what} {reason} ({_ALLOW_HOSTS_HINT})")
        return all_allowed

    @staticmethod
    def _next_hop(original: str, hop: httpx.URL, location: str) -> httpx.URL:
        try:
            return hop.join(location)
        except httpx.InvalidURL as exc:
            raise ImageFetchError(
                f"fetching {_shown(original)} failed: bad redirect to {_shown(location)} ({exc})"
            ) from exc

    def _parse(self, url: str, label: str) -> httpx.URL:
        try:
            return parsed_url(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ImageFetchError(f"{label} {_shown(url)} is not a valid URL: {exc}") from exc

    @staticmethod
    def _headers() -> dict[str, str]:
        # identity: a compressed body could expand far past max_bytes once decoded.
        return {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}

    # --- responses ---------------------------------------------------------------------------

    @staticmethod
    def _raise_for_status(original: str, hop: httpx.URL, response: httpx.Response) -> None:
        if response.status_code < 300:
            return
        where = f" (at {_shown(hop)})" if _is_redirect(original, hop) else ""
        raise ImageFetchError(
            f"fetching {_shown(original)} failed: HTTP {response.status_code}{where}"
        )

    def _read_capped(
        self, original: str, label: str, response: httpx.Response, limit_bytes: int
    ) -> bytes:
        too_big = (
            f"{label} {_shown(original)} is larger than the {_format_bytes(limit_bytes)} limit"
        )
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit_bytes:
            raise ImageFetchError(f"{too_big} (Content-Length: {int(declared)} bytes)")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ImageFetchError(
                f"fetching {_shown(original)} failed: the server sent a {encoding!r}-encoded "
                "body although only an unencoded one was accepted"
            )
        chunks: list[bytes] = []
        received = 0
        for chunk in response.iter_raw():
            received += len(chunk)
            if received > limit_bytes:
                raise ImageFetchError(too_big)
            chunks.append(chunk)
        return b"".join(chunks)

    # --- errors ------------------------------------------------------------------------------

    def _network_error(
        self, original: str, hop: httpx.URL, exc: httpx.HTTPError, deadline: _Deadline
    ) -> ImageFetchError:
        if deadline.passed or isinstance(exc, httpx.TimeoutException):
            return self._too_slow(original, deadline.timeout_s)
        where = f" (at {_shown(hop)})" if _is_redirect(original, hop) else ""
        return ImageFetchError(f"fetching {_shown(original)} failed{where}: {exc}")

    @staticmethod
    def _too_slow(original: str, timeout_s: float) -> ImageFetchError:
        return ImageFetchError(
            f"fetching {_shown(original)} took longer than {timeout_s:g} s (the limit for the "
            "whole transfer)"
        )


def _check_image_content_type(original: str, label: str, response: httpx.Response) -> None:
    """Refuse a declared non-image type (an HTML error page, JSON, a redirect portal): the
    decoder would refuse the bytes anyway, but this says what really came back."""
    declared = response.headers.get("content-type", "").partition(";")[0].strip().lower()
    if not declared or declared.startswith("image/") or declared in _GENERIC_BINARY_TYPES:
        return
    raise ImageFetchError(
        f"{label} {_shown(original)} answered Content-Type {declared!r}, not an image; an "
        "image URL must serve image/* (or a generic binary type)"
    )


_GENERIC_BINARY_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})


# --- data: URIs ----------------------------------------------------------------------------

_HEADER_SEARCH_CHARS = 1024  # a data: URI's media type and parameters come first
_WHITESPACE_BYTES = b" \t\n\r\x0b\x0c"  # what the regex \s matches in bytes
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


@dataclass(frozen=True, slots=True)
class _DataUri:
    mime: str
    is_base64: bool
    payload: str

    def decoded_size_estimate(self) -> int:
        """Upper bound of the decoded size, computed without decoding."""
        if not self.is_base64:
            return len(self.payload)  # percent-encoding only ever shrinks when decoded
        padding = len(self.payload) - len(self.payload.rstrip("="))
        return len(self.payload) * 3 // 4 - padding


def _is_data_uri(source: str) -> bool:
    return source[:5].lower() == "data:"


def _parse_data_uri(uri: str, error: type[InputError]) -> _DataUri:
    comma = uri.find(",", 0, _HEADER_SEARCH_CHARS)
    if not _is_data_uri(uri) or comma < 0:
        raise error("a data URI must look like data:image/png;base64,<data>")
    params = [part.strip().lower() for part in uri[5:comma].split(";")]
    mime = params[0] or "text/plain"  # RFC 2397's default
    if mime not in ALLOWED_DATA_URI_MIME_TYPES:
        allowed = ", ".join(ALLOWED_DATA_URI_MIME_TYPES)
        raise error(f"data URI media type {mime!r} is not an allowed image type ({allowed})")
    return _DataUri(mime, len(params) > 1 and params[-1] == "base64", uri[comma + 1 :])


def _check_data_uri_size(data_uri: _DataUri, max_bytes: int, error: type[InputError]) -> None:
    size = data_uri.decoded_size_estimate()
    if size > max_bytes:
        raise error(
            f"the data URI holds about {_format_bytes(size)}, more than the "
            f"{_format_bytes(max_bytes)} limit for an input image"
        )


def _decode_base64(payload: str) -> bytes:
    try:
        data = payload.encode("ascii")
    except UnicodeEncodeError:
        raise ImageDecodeError("the data URI's payload is not valid base64") from None
    # Accept the URL-safe alphabet too, and drop whitespace (some tools wrap base64 at 76
    # characters): one pass, ~15x faster than a regex over a 1 MP image's 464 kB.
    data = data.translate(_URLSAFE_TO_STANDARD, _WHITESPACE_BYTES)
    data += b"=" * (-len(data) % 4)  # and missing padding
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise ImageDecodeError(f"the data URI's payload is not valid base64 ({exc})") from None


def decode_data_uri(uri: str, *, max_bytes: int) -> bytes:
    """The bytes of a ``data:`` URI with an allowed image media type.

    The size is checked BEFORE decoding. Accepts base64 (standard or URL-safe alphabet,
    padding optional, whitespace ignored) and percent-encoded payloads. Raises
    ImageDecodeError (too large, bad media type, invalid base64, empty).
    """
    data_uri = _parse_data_uri(uri, ImageDecodeError)
    _check_data_uri_size(data_uri, max_bytes, ImageDecodeError)
    if data_uri.is_base64:
        data = _decode_base64(data_uri.payload)
    else:
        data = urllib.parse.unquote_to_bytes(data_uri.payload)
    if not data:
        raise ImageDecodeError("the data URI holds no data")
    if len(data) > max_bytes:  # cannot happen after the estimate; kept as the last word
        raise ImageDecodeError(
            f"the data URI holds {_format_bytes(len(data))}, more than the "
            f"{_format_bytes(max_bytes)} limit for an input image"
        )
    return data


def _check_http_url_shape(url: str) -> None:
    if len(url) > MAX_URL_CHARS:
        raise InputError(f"an image URL may have at most {MAX_URL_CHARS} characters")
    try:
        parsed = parsed_url(url)
    except httpx.InvalidURL as exc:
        raise InputError(f"{_shown(url)!r} is not a valid URL ({exc})") from None
    if parsed.scheme not in _DEFAULT_PORTS:
        raise InputError(
            f"{_shown(url)!r} is not an image source: use an http(s) URL or a data: URI "
            "(data:image/png;base64,...)"
        )
    if not parsed.raw_host:
        raise InputError(f"{_shown(url)!r} has no host")


def check_image_source(url: str, *, max_data_uri_bytes: int) -> None:
    """Cheap syntax check at submit time: no network, no decoding. Raises InputError.

    Accepts an http(s) URL with a host, or a ``data:`` URI with an allowed image media type
    whose decoded size (estimated from its length) is within ``max_data_uri_bytes``.
    """
    if _is_data_uri(url):
        data_uri = _parse_data_uri(url, InputError)
        _check_data_uri_size(data_uri, max_data_uri_bytes, InputError)
        return
    _check_http_url_shape(url)


def load_image_bytes(source: str, fetcher: SafeFetcher, *, max_bytes: int) -> bytes:
    """The raw bytes of an image source: a ``data:`` URI or an http(s) URL (via ``fetcher``).

    Raises ImageDecodeError for a bad data URI and ImageFetchError for a URL that cannot be
    fetched; both are InputError.
    """
    if _is_data_uri(source):
        return decode_data_uri(source, max_bytes=max_bytes)
    return fetcher.fetch(source, max_bytes=max_bytes, image_only=True)
