"""SafeFetcher against a real HTTP(S) server on 127.0.0.1, plus data: URIs."""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.server
import ipaddress
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kontext_server.domain.errors import ImageDecodeError, ImageFetchError, InputError
from kontext_server.net.fetch import (
    SafeFetcher,
    URLNotAllowedError,
    check_image_source,
    decode_data_uri,
    load_image_bytes,
)

IMAGE = b"\x89PNG\r\n\x1a\n" + b"pretend image bytes" * 10
PUBLIC_IP = "93.184.215.14"  # never contacted: every test using it is refused before connect
CHUNK = b"x" * 65536

Handler = http.server.BaseHTTPRequestHandler
Route = Callable[[Handler], None]


# --- a recording loopback server -------------------------------------------------------------


@dataclass
class RecordingServer:
    """A loopback HTTP(S) server that counts connections and records requests."""

    port: int = 0
    connections: int = 0
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    sni_names: list[str | None] = field(default_factory=list)
    redirect_to: str = ""

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"


def _send_image(handler: Handler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", str(len(IMAGE)))
    handler.end_headers()
    handler.wfile.write(IMAGE)


def _send_redirect(handler: Handler, location: str) -> None:
    handler.send_response(302)
    handler.send_header("Location", location)
    handler.send_header("Content-Length", "0")
    handler.end_headers()


def _send_huge_declared(handler: Handler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(10 * 1024 * 1024))
    handler.end_headers()
    handler.wfile.write(b"x" * 1000)


def _send_endless_chunked(handler: Handler, *, declared_length: str | None = None) -> None:
    handler.send_response(200)
    if declared_length is not None:
        handler.send_header("Content-Length", declared_length)  # a lie next to chunked
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    for _ in range(2000):  # "endless": far past any cap a test sets
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))


def _send_endless_until_close(handler: Handler) -> None:
    handler.protocol_version = "HTTP/1.0"  # body delimited by closing the connection
    handler.close_connection = True
    handler.send_response(200)
    handler.end_headers()
    for _ in range(2000):
        handler.wfile.write(CHUNK)


def _send_trickle(handler: Handler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    for _ in range(1000):
        handler.wfile.write(b"x")
        handler.wfile.flush()
        time.sleep(0.05)


def _hang(handler: Handler) -> None:
    time.sleep(3)


def _send_status(handler: Handler, status: int) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", "0")
    handler.end_headers()


def _routes(server: RecordingServer) -> dict[str, Route]:
    return {
        "/image": _send_image,
        "/redirect": lambda h: _send_redirect(h, server.redirect_to),
        "/redirect-relative": lambda h: _send_redirect(h, "/image"),
        "/redirect-loop": lambda h: _send_redirect(h, "/redirect-loop"),
        "/huge-declared": _send_huge_declared,
        "/endless-chunked": _send_endless_chunked,
        "/lying-length": lambda h: _send_endless_chunked(h, declared_length="10"),
        "/endless-until-close": _send_endless_until_close,
        "/trickle": _send_trickle,
        "/hang": _hang,
        "/missing": lambda h: _send_status(h, 404),
        "/created": lambda h: _send_status(h, 201),
    }


def _handler_class(server: RecordingServer) -> type[Handler]:
    routes = _routes(server)

    class RecordingHandler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            server.requests.append((self.command, self.path, dict(self.headers.items())))
            route = routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                route(self)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            self.rfile.read(length)
            self.do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass

    return RecordingHandler


class _CountingHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, recorder: RecordingServer, context: ssl.SSLContext | None) -> None:
        self.recorder = recorder
        self.context = context
        super().__init__(("127.0.0.1", 0), _handler_class(recorder))

    def verify_request(self, request: object, client_address: object) -> bool:
        self.recorder.connections += 1
        return True

    def finish_request(self, request: object, client_address: object) -> None:
        if self.context is not None:
            try:
                request = self.context.wrap_socket(request, server_side=True)  # type: ignore[arg-type]
            except (ssl.SSLError, OSError):
                return
        super().finish_request(request, client_address)  # type: ignore[arg-type]

    def handle_error(self, request: object, client_address: object) -> None:
        pass


@contextlib.contextmanager
def _serving(context: ssl.SSLContext | None = None) -> Iterator[RecordingServer]:
    recorder = RecordingServer()
    httpd = _CountingHTTPServer(recorder, context)
    recorder.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield recorder
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def fetch_server() -> Iterator[RecordingServer]:
    with _serving() as server:
        yield server


def make_fetcher(
    allow_hosts: Sequence[str] = (),
    *,
    timeout_s: float = 5.0,
    max_bytes: int = 1024 * 1024,
    max_redirects: int = 5,
    resolver: Callable[[str, int], Sequence[str]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> SafeFetcher:
    extra = {} if resolver is None else {"resolver": resolver}
    return SafeFetcher(
        allow_hosts=list(allow_hosts),
        allow_ports=[80, 443],
        timeout_s=timeout_s,
        max_bytes=max_bytes,
        max_redirects=max_redirects,
        ssl_context=ssl_context,
        **extra,
    )


class FakeDNS:
    """A hand-written resolver: fixed answers, and a count of lookups per host."""

    def __init__(self, answers: dict[str, list[str]], delay_s: float = 0.0) -> None:
        self.answers = answers
        self.delay_s = delay_s
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        time.sleep(self.delay_s)
        if host not in self.answers:
            raise OSError(f"fake DNS has no answer for {host}")
        return self.answers[host]


# --- address policy --------------------------------------------------------------------------


def test_loopback_is_refused_without_allow_list_and_no_connection_is_made(
    fetch_server: RecordingServer,
) -> None:
    with pytest.raises(ImageFetchError) as caught:
        make_fetcher().fetch(fetch_server.url("/image"))
    message = str(caught.value)
    assert message.startswith(f"image_url {fetch_server.url('/image')} is not allowed: ")
    assert "127.0.0.1 is a loopback address" in message
    assert "KONTEXT_FETCH_ALLOW_HOSTS" in message
    assert fetch_server.connections == 0


@pytest.mark.parametrize("allow", ["127.0.0.1", "127.0.0.0/8", "[127.0.0.1]"])
def test_allow_listed_address_is_fetched_on_any_port(
    fetch_server: RecordingServer, allow: str
) -> None:
    assert make_fetcher([allow]).fetch(fetch_server.url("/image")) == IMAGE
    assert fetch_server.connections == 1


def test_allow_listed_host_name_is_fetched(fetch_server: RecordingServer) -> None:
    dns = FakeDNS({"images.internal": ["127.0.0.1"]})
    fetcher = make_fetcher(["IMAGES.internal."], resolver=dns)
    assert fetcher.fetch(fetch_server.url("/image", host="images.internal")) == IMAGE


def test_wildcard_allow_list_entry_matches_subdomains_only(
    fetch_server: RecordingServer,
) -> None:
    dns = FakeDNS({"a.corp.test": ["127.0.0.1"], "corp.test.evil": ["127.0.0.1"]})
    fetcher = make_fetcher(["*.corp.test"], resolver=dns)
    assert fetcher.fetch(fetch_server.url("/image", host="a.corp.test")) == IMAGE
    with pytest.raises(ImageFetchError, match="loopback"):
        fetcher.fetch(fetch_server.url("/image", host="corp.test.evil"))


@pytest.mark.parametrize(
    "host", ["127.1", "2130706433", "0x7f000001", "[::1]", "localhost", "LOCALHOST"]
)
def test_loopback_spellings_are_refused(fetch_server: RecordingServer, host: str) -> None:
    with pytest.raises(URLNotAllowedError, match="a loopback address") as caught:
        make_fetcher().fetch(fetch_server.url("/image", host=host))
    assert "redirects" not in str(caught.value)
    assert fetch_server.connections == 0


def test_ipv4_mapped_loopback_is_unwrapped_and_refused(fetch_server: RecordingServer) -> None:
    with pytest.raises(ImageFetchError) as caught:
        make_fetcher().fetch(fetch_server.url("/image", host="[::ffff:127.0.0.1]"))
    assert "an IPv4-mapped form of 127.0.0.1, a loopback address" in str(caught.value)
    assert fetch_server.connections == 0


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://10.0.0.1/x.png", "a private address"),
        ("http://172.16.5.4/x.png", "a private address"),
        ("http://192.168.1.1/x.png", "a private address"),
        ("http://169.254.169.254/latest/meta-data/", "a link-local address"),
        ("http://100.64.0.1/x.png", "a shared (CGNAT) address"),
        ("http://0.0.0.0/x.png", "an unspecified address"),
        ("http://224.0.0.1/x.png", "a multicast address"),
        ("http://240.0.0.1/x.png", "a private address"),
        ("http://[::]/x.png", "an unspecified address"),
        ("http://[fe80::1]/x.png", "a link-local address"),
        ("http://[fd00:ec2::254]/x.png", "a unique-local (private) address"),
        ("http://[fec0::1]/x.png", "a site-local address"),
        ("http://[ff02::1]/x.png", "a multicast address"),
        ("http://[64:ff9b::a9fe:a9fe]/x.png", "a NAT64 form of 169.254.169.254"),
        ("http://[64:ff9b:1::1]/x.png", "a local-use NAT64 address"),
        ("http://[2002:c0a8:101::]/x.png", "a 6to4 form of 192.168.1.1, a private address"),
        ("http://[::ffff:10.0.0.1]/x.png", "an IPv4-mapped form of 10.0.0.1"),
    ],
)
def test_private_and_special_addresses_are_refused(url: str, reason: str) -> None:
    with pytest.raises(ImageFetchError, match="is not allowed") as caught:
        make_fetcher(timeout_s=1).fetch(url)
    assert reason in str(caught.value)


def test_host_with_one_private_address_among_public_ones_is_refused(
    fetch_server: RecordingServer,
) -> None:
    dns = FakeDNS({"rebind.test": [PUBLIC_IP, "127.0.0.1"]})
    with pytest.raises(ImageFetchError, match=r"rebind\.test resolves to 127\.0\.0\.1"):
        make_fetcher(resolver=dns).fetch(fetch_server.url("/image", host="rebind.test"))
    assert fetch_server.connections == 0


def test_port_outside_allow_ports_is_refused_for_public_hosts() -> None:
    with pytest.raises(ImageFetchError, match="port 22 is not allowed") as caught:
        make_fetcher(timeout_s=1).fetch(f"http://{PUBLIC_IP}:22/x.png")
    assert "allowed ports: 80, 443" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://example.com/x.png", "gopher://example.com/", "//example.com/x"],
)
def test_non_http_schemes_are_refused(url: str) -> None:
    with pytest.raises(ImageFetchError, match="only http and https URLs can be fetched"):
        make_fetcher().fetch(url)


def test_connection_goes_to_the_checked_address_without_a_second_lookup(
    fetch_server: RecordingServer,
) -> None:
    dns = FakeDNS({"images.test": ["127.0.0.1"]})
    fetcher = make_fetcher(["127.0.0.1"], resolver=dns)
    assert fetcher.fetch(fetch_server.url("/image", host="images.test")) == IMAGE
    assert dns.lookups == ["images.test"]  # the system resolver cannot answer for .test
    _, _, headers = fetch_server.requests[0]
    assert headers["Host"] == f"images.test:{fetch_server.port}"


def test_unresolvable_host_says_so() -> None:
    with pytest.raises(ImageFetchError, match=r"cannot resolve host 'nowhere\.test'"):
        make_fetcher(resolver=FakeDNS({})).fetch("http://nowhere.test/x.png")


# --- redirects -------------------------------------------------------------------------------


def test_redirect_to_a_forbidden_address_is_refused_at_the_hop(
    fetch_server: RecordingServer,
) -> None:
    dns = FakeDNS({"allowed.test": ["127.0.0.1"]})
    fetch_server.redirect_to = fetch_server.url("/image")  # 127.0.0.1, not allow-listed
    start = fetch_server.url("/redirect", host="allowed.test")
    with pytest.raises(ImageFetchError) as caught:
        make_fetcher(["allowed.test"], resolver=dns).fetch(start)
    message = str(caught.value)
    assert f"it redirects to {fetch_server.redirect_to} and 127.0.0.1 is a loopback" in message
    assert [path for _, path, _ in fetch_server.requests] == ["/redirect"]


def test_redirect_to_a_metadata_address_is_refused(fetch_server: RecordingServer) -> None:
    fetch_server.redirect_to = "http://169.254.169.254/latest/meta-data/"
    with pytest.raises(ImageFetchError, match=r"redirects to .* link-local"):
        make_fetcher(["127.0.0.1"], timeout_s=1).fetch(fetch_server.url("/redirect"))


def test_relative_redirect_within_an_allowed_host_is_followed(
    fetch_server: RecordingServer,
) -> None:
    fetched = make_fetcher(["127.0.0.1"]).fetch(fetch_server.url("/redirect-relative"))
    assert fetched == IMAGE


def test_redirect_loop_stops_after_max_redirects(fetch_server: RecordingServer) -> None:
    fetcher = make_fetcher(["127.0.0.1"], max_redirects=2)
    with pytest.raises(ImageFetchError, match="more than 2 redirects"):
        fetcher.fetch(fetch_server.url("/redirect-loop"))
    assert len(fetch_server.requests) == 3


# --- byte and time caps ----------------------------------------------------------------------


def test_declared_content_length_over_the_cap_is_refused_early(
    fetch_server: RecordingServer,
) -> None:
    with pytest.raises(ImageFetchError, match=r"larger than the 1 MiB limit \(Content-Length"):
        make_fetcher(["127.0.0.1"]).fetch(fetch_server.url("/huge-declared"))


@pytest.mark.parametrize("path", ["/endless-chunked", "/endless-until-close", "/lying-length"])
def test_endless_body_is_cut_at_max_bytes(fetch_server: RecordingServer, path: str) -> None:
    fetcher = make_fetcher(["127.0.0.1"], max_bytes=200_000)
    start = time.monotonic()
    with pytest.raises(ImageFetchError, match=r"is larger than the 195\.3 KiB limit"):
        fetcher.fetch(fetch_server.url(path))
    assert time.monotonic() - start < 3


def test_per_call_max_bytes_overrides_the_fetcher_cap(fetch_server: RecordingServer) -> None:
    with pytest.raises(ImageFetchError, match="larger than the 10 bytes limit"):
        make_fetcher(["127.0.0.1"]).fetch(fetch_server.url("/image"), max_bytes=10)


@pytest.mark.parametrize("path", ["/trickle", "/hang"])
def test_whole_fetch_is_capped_in_time(fetch_server: RecordingServer, path: str) -> None:
    fetcher = make_fetcher(["127.0.0.1"], timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(ImageFetchError, match=r"took longer than 0\.5 s"):
        fetcher.fetch(fetch_server.url(path))
    assert time.monotonic() - start < 1.5


def test_slow_name_resolution_counts_against_the_time_cap() -> None:
    dns = FakeDNS({"slow.test": [PUBLIC_IP]}, delay_s=1.0)
    start = time.monotonic()
    with pytest.raises(ImageFetchError, match=r"took longer than 0\.2 s"):
        make_fetcher(timeout_s=0.2, resolver=dns).fetch("http://slow.test/x.png")
    assert time.monotonic() - start < 0.8


def test_http_error_status_is_reported(fetch_server: RecordingServer) -> None:
    url = fetch_server.url("/missing")
    with pytest.raises(ImageFetchError, match=rf"^fetching {url} failed: HTTP 404$"):
        make_fetcher(["127.0.0.1"]).fetch(url)


def test_refused_connection_is_reported() -> None:
    with _serving() as server:
        url = server.url("/image")
    with pytest.raises(ImageFetchError, match=f"fetching {url} failed"):
        make_fetcher(["127.0.0.1"]).fetch(url)


# --- TLS -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    server_context: ssl.SSLContext
    client_context: ssl.SSLContext


def _self_signed(host: str, directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def fetch_tls(tmp_path: Path) -> TLSFiles:
    cert_path, key_path = _self_signed("images.test", tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    client_context = ssl.create_default_context(cafile=str(cert_path))
    return TLSFiles(server_context, client_context)


def test_https_verifies_the_certificate_and_sends_sni_for_the_url_host(
    fetch_tls: TLSFiles,
) -> None:
    sni_names: list[str | None] = []
    fetch_tls.server_context.sni_callback = lambda sock, name, ctx: sni_names.append(name)
    dns = FakeDNS({"images.test": ["127.0.0.1"]})
    fetcher = make_fetcher(["127.0.0.1"], resolver=dns, ssl_context=fetch_tls.client_context)
    with _serving(fetch_tls.server_context) as server:
        assert fetcher.fetch(server.url("/image", host="images.test", scheme="https")) == IMAGE
        with pytest.raises(ImageFetchError, match="CERTIFICATE_VERIFY_FAILED"):
            fetcher.fetch(server.url("/image", scheme="https"))  # cert is not for 127.0.0.1
    assert sni_names[0] == "images.test"


# --- post (webhooks) -------------------------------------------------------------------------


def test_post_returns_the_status_and_follows_no_redirect(fetch_server: RecordingServer) -> None:
    fetcher = make_fetcher(["127.0.0.1"])
    fetch_server.redirect_to = fetch_server.url("/created")
    headers = {"Content-Type": "application/json"}
    assert fetcher.post(fetch_server.url("/created"), b"{}", headers, 2.0) == 201
    assert fetcher.post(fetch_server.url("/redirect"), b"{}", headers, 2.0) == 302
    assert [(method, path) for method, path, _ in fetch_server.requests] == [
        ("POST", "/created"),
        ("POST", "/redirect"),
    ]
    assert fetch_server.requests[0][2]["Content-Type"] == "application/json"


def test_post_to_loopback_is_refused_without_allow_list(fetch_server: RecordingServer) -> None:
    with pytest.raises(ImageFetchError, match=r"^webhook URL .* 127\.0\.0\.1 is a loopback"):
        make_fetcher().post(fetch_server.url("/created"), b"{}", {}, 2.0)
    assert fetch_server.connections == 0


def test_post_is_capped_in_time(fetch_server: RecordingServer) -> None:
    start = time.monotonic()
    with pytest.raises(ImageFetchError, match=r"took longer than 0\.3 s"):
        make_fetcher(["127.0.0.1"]).post(fetch_server.url("/hang"), b"{}", {}, 0.3)
    assert time.monotonic() - start < 1.0


# --- data: URIs and submit-time checks ---------------------------------------------------------


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_data_uri_is_decoded() -> None:
    assert decode_data_uri(_data_uri(IMAGE), max_bytes=1024) == IMAGE


def test_data_uri_accepts_url_safe_alphabet_missing_padding_and_line_breaks() -> None:
    data = bytes(range(256)) * 3
    encoded = base64.urlsafe_b64encode(data).decode().rstrip("=")
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert decode_data_uri(f"data:image/jpeg;base64,{wrapped}", max_bytes=1024) == data


@pytest.mark.parametrize("separator", [" ", "\t", "\r\n", "\x0b", "\x0c", " \n\t"])
def test_data_uri_ignores_every_kind_of_whitespace(separator: str) -> None:
    data = bytes(range(256))
    encoded = base64.b64encode(data).decode()
    spaced = separator.join(encoded[i : i + 10] for i in range(0, len(encoded), 10))
    assert decode_data_uri(f"data:image/jpeg;base64,{spaced}", max_bytes=1024) == data


def test_percent_encoded_data_uri_is_decoded() -> None:
    assert decode_data_uri("data:image/bmp,BM%00%01", max_bytes=100) == b"BM\x00\x01"


def test_data_uri_too_big_is_refused_before_decoding() -> None:
    # Not valid base64 at all: a size error proves the size was checked first.
    uri = "data:image/png;base64," + "!" * 4000
    with pytest.raises(ImageDecodeError, match=r"holds about 2\.9 KiB, more than the 1 KiB"):
        decode_data_uri(uri, max_bytes=1024)


def test_data_uri_exactly_at_the_cap_is_accepted() -> None:
    data = b"x" * 1000
    assert decode_data_uri(_data_uri(data), max_bytes=1000) == data
    with pytest.raises(ImageDecodeError, match="more than"):
        decode_data_uri(_data_uri(data), max_bytes=999)


@pytest.mark.parametrize("payload", ["not*base64", "QUJD$A==", "Q", "ñañá"])
def test_invalid_base64_is_refused(payload: str) -> None:
    with pytest.raises(ImageDecodeError, match="not valid base64"):
        decode_data_uri(f"data:image/png;base64,{payload}", max_bytes=1024)


@pytest.mark.parametrize(
    "uri",
    ["data:text/html;base64,PGgxPg==", "data:,hello", "data:image/svg+xml;base64,PHN2Zz4="],
)
def test_data_uri_with_non_image_media_type_is_refused(uri: str) -> None:
    with pytest.raises(ImageDecodeError, match="is not an allowed image type"):
        decode_data_uri(uri, max_bytes=1024)


def test_empty_and_malformed_data_uris_are_refused() -> None:
    with pytest.raises(ImageDecodeError, match="holds no data"):
        decode_data_uri("data:image/png;base64,", max_bytes=1024)
    with pytest.raises(ImageDecodeError, match="must look like"):
        decode_data_uri("data:image/png;base64" + "A" * 2000, max_bytes=10_000)


@pytest.mark.parametrize(
    "source",
    [
        "https://example.com/cat.png",
        "http://does-not-exist.invalid:8080/a.jpg?x=1",  # no network at submit time
        "http://127.0.0.1/x.png",  # the address policy runs in the worker, with the allow-list
        "data:image/jpeg;base64,/9j/4AAQ",
    ],
)
def test_check_image_source_accepts_urls_and_image_data_uris(source: str) -> None:
    check_image_source(source, max_data_uri_bytes=1024)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("ftp://example.com/x.png", "use an http\\(s\\) URL or a data: URI"),
        ("cat.png", "use an http\\(s\\) URL or a data: URI"),
        ("http:///x.png", "has no host"),
        ("https://example.com/" + "a" * 9000, "at most 8192 characters"),
        ("data:text/plain;base64,aGk=", "not an allowed image type"),
        (_data_uri(b"x" * 2000), "more than the 1 KiB limit"),
    ],
)
def test_check_image_source_refuses_with_a_clear_message(source: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as caught:
        check_image_source(source, max_data_uri_bytes=1024)
    assert type(caught.value) is InputError  # bad_request at submit, not a fetch error


def test_load_image_bytes_reads_data_uris_and_urls(fetch_server: RecordingServer) -> None:
    fetcher = make_fetcher(["127.0.0.1"])
    assert load_image_bytes(_data_uri(IMAGE), fetcher, max_bytes=1024) == IMAGE
    assert load_image_bytes(fetch_server.url("/image"), fetcher, max_bytes=1024) == IMAGE
    with pytest.raises(ImageFetchError, match="larger than the 100 bytes limit"):
        load_image_bytes(fetch_server.url("/image"), fetcher, max_bytes=100)


def test_ip_literals_in_the_test_list_are_what_they_claim() -> None:
    # Guards the parametrized lists above against typos that would make them pass vacuously.
    assert ipaddress.ip_address(PUBLIC_IP).is_global
