"""Hostile URLs and images beyond tests/unit/test_fetch.py and test_imaging.py: more loopback
spellings, names that resolve inward, redirects to every forbidden kind of target, wrong
content types, formats outside the allow-list, absurd aspect ratios, animated WebP, and a
worker that keeps serving after each of them. A loopback listener counts connections, so
"refused" also means "never connected"."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from kontext_server.domain.editing import EditInput, EditRequest, EditResult, EncodedImage
from kontext_server.domain.errors import ImageDecodeError, ImageFetchError
from kontext_server.domain.jobs import JobStatus, NewJob
from kontext_server.files.local import LocalFileStore
from kontext_server.net.fetch import SafeFetcher, URLNotAllowedError, load_image_bytes
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.worker.imaging import MAX_ASPECT_RATIO, decode_image
from kontext_server.worker.runner import JobRunner

PNG = b"\x89PNG\r\n\x1a\n" + b"pretend" * 10


class Listener:
    """A loopback HTTP server that counts connections; ``/r?to=URL`` redirects to URL,
    ``/typed?ct=TYPE`` answers bytes labelled TYPE."""

    def __init__(self) -> None:
        self.connections = 0
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                if self.path.startswith("/r?"):
                    self.send_response(302)
                    self.send_header("Location", query["to"][0])
                    body = b""
                else:
                    self.send_response(200)
                    self.send_header("Content-Type", query.get("ct", ["image/png"])[0])
                    body = PNG
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request: object, client_address: object) -> bool:
                listener.connections += 1
                return True

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    @contextlib.contextmanager
    def serving(self) -> Iterator[Listener]:
        thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            yield self
        finally:
            self._httpd.shutdown()
            self._httpd.server_close()
            thread.join()


@pytest.fixture
def listener() -> Iterator[Listener]:
    with Listener().serving() as running:
        yield running


class FakeDNS:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    def __call__(self, host: str, port: int) -> Sequence[str]:
        if host not in self.answers:
            raise OSError(f"no answer for {host}")
        return self.answers[host]


def fetcher(allow_hosts: Sequence[str] = (), resolver: FakeDNS | None = None) -> SafeFetcher:
    extra = {} if resolver is None else {"resolver": resolver}
    return SafeFetcher(
        allow_hosts=list(allow_hosts), allow_ports=[80, 443], timeout_s=3, max_bytes=1 << 20,
        **extra,  # type: ignore[arg-type]
    )  # fmt: skip


# --- SSRF ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("0177.0.0.1", "not a valid URL"),  # octal: httpx refuses to guess
        ("0x7f.0.0.1", "loopback"),
        ("017700000001", "loopback"),
        ("0x7f000001", "loopback"),
        ("127.0.0.2", "loopback"),
        ("[::ffff:7f00:1]", "loopback"),
        ("[0:0:0:0:0:0:0:1]", "loopback"),
    ],
)
def test_more_loopback_spellings_are_refused_without_connecting(
    listener: Listener, host: str, reason: str
) -> None:
    with pytest.raises(ImageFetchError, match=reason):
        fetcher().fetch(listener.url("/img", host=host))
    assert listener.connections == 0


def test_a_name_that_resolves_to_a_private_address_is_refused(listener: Listener) -> None:
    dns = FakeDNS({"intranet.test": ["10.1.2.3"]})
    with pytest.raises(URLNotAllowedError, match=r"intranet\.test resolves to 10\.1\.2\.3"):
        fetcher(resolver=dns).fetch("http://intranet.test/x.png")


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://127.0.0.1:{port}/img", "a loopback address"),
        ("http://localhost:{port}/img", "a loopback address"),
        ("http://[::1]:{port}/img", "a loopback address"),
        ("http://2130706433:{port}/img", "a loopback address"),
        ("http://0.0.0.0:{port}/img", "an unspecified address"),
        ("http://169.254.169.254/latest/meta-data/", "a link-local address"),
        ("http://[fd00:ec2::254]/latest/", "a unique-local"),
        ("http://10.0.0.1/x.png", "a private address"),
        ("http://100.64.0.1/x.png", "CGNAT"),
        ("http://[64:ff9b::7f00:1]/x.png", "a NAT64 form of 127.0.0.1"),
        ("http://[2002:7f00:1::]/x.png", "a 6to4 form of 127.0.0.1"),
        ("http://intranet.test/x.png", "resolves to 192.168.0.10"),
        ("http://mixed.test/x.png", "resolves to 127.0.0.1"),
        ("http://93.184.215.14:22/x.png", "port 22 is not allowed"),
        ("file:///etc/passwd", "only http and https"),
        ("gopher://127.0.0.1:70/_", "only http and https"),
        ("ftp://example.com/x.png", "only http and https"),
    ],
)
def test_a_redirect_to_any_forbidden_target_is_refused_at_the_hop(
    listener: Listener, target: str, reason: str
) -> None:
    dns = FakeDNS(
        {
            "start.test": ["127.0.0.1"],
            "localhost": ["127.0.0.1"],
            "2130706433": ["127.0.0.1"],  # what getaddrinfo makes of it
            "intranet.test": ["192.168.0.10"],
            "mixed.test": ["93.184.215.14", "127.0.0.1"],
        }
    )
    location = target.format(port=listener.port)
    start = listener.url(f"/r?to={location}", host="start.test")
    with pytest.raises(URLNotAllowedError) as refused:
        fetcher(["start.test"], resolver=dns).fetch(start)
    assert "redirects to" in str(refused.value) and reason in str(refused.value)
    assert listener.connections == 1  # only the allowed first hop


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/json"])
def test_an_image_url_answering_a_non_image_type_is_refused(
    listener: Listener, content_type: str
) -> None:
    with pytest.raises(ImageFetchError, match="not an image"):
        load_image_bytes(
            listener.url(f"/typed?ct={content_type}"), fetcher(["127.0.0.1"]), max_bytes=1 << 20
        )


@pytest.mark.parametrize("content_type", ["image/png", "application/octet-stream", ""])
def test_image_and_generic_binary_types_are_accepted(listener: Listener, content_type: str) -> None:
    url = listener.url(f"/typed?ct={content_type}")
    assert load_image_bytes(url, fetcher(["127.0.0.1"]), max_bytes=1 << 20) == PNG


def test_the_allow_list_opens_a_chosen_private_host(listener: Listener) -> None:
    dns = FakeDNS({"minio.internal": ["127.0.0.1"]})
    url = listener.url("/img", host="minio.internal")
    assert fetcher(["minio.internal"], resolver=dns).fetch(url) == PNG
    with pytest.raises(URLNotAllowedError):
        fetcher(["other.internal"], resolver=dns).fetch(url)


# --- hostile images --------------------------------------------------------------------------


def _saved(fmt: str, size: tuple[int, int] = (8, 8), **params: object) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format=fmt, **params)
    return buffer.getvalue()


OUTSIDE_THE_ALLOW_LIST = {
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>',
    "psd": b"8BPS\x00\x01"
    + b"\x00" * 6
    + b"\x00\x03\x00\x00\x00\x08\x00\x00\x00\x08\x00\x08"
    + b"\x00\x03"
    + b"\x00" * 64,
    "fits": b"SIMPLE  =                    T".ljust(80)
    + b"BITPIX  =                    8".ljust(80)
    + b"NAXIS   =                    0".ljust(80)
    + b"END".ljust(80)
    + b" " * 2560,
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    "tiff": _saved("TIFF"),
    "ico": _saved("ICO"),
    "tga": _saved("TGA"),
    "ppm": _saved("PPM"),
    "pcx": _saved("PCX"),
}


@pytest.mark.parametrize("fmt", sorted(OUTSIDE_THE_ALLOW_LIST))
def test_formats_outside_the_allow_list_are_refused(fmt: str) -> None:
    with pytest.raises(ImageDecodeError, match="not a JPEG, PNG, WebP, GIF, AVIF or BMP image"):
        decode_image(OUTSIDE_THE_ALLOW_LIST[fmt], max_pixels=1_000_000)


@pytest.mark.parametrize("size", [(1, 1000), (4000, 3), (21 * 10, 10)])
def test_absurd_aspect_ratios_are_refused_before_decoding(size: tuple[int, int]) -> None:
    with pytest.raises(ImageDecodeError, match=f"at most {MAX_ASPECT_RATIO} times the shorter"):
        decode_image(_saved("PNG", size), max_pixels=1_000_000)


def test_the_widest_allowed_aspect_ratio_decodes() -> None:
    assert decode_image(_saved("PNG", (20 * 8, 8)), max_pixels=1_000_000).size == (160, 8)


def test_an_animated_webp_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue", "green")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    decoded = decode_image(buffer.getvalue(), max_pixels=1_000_000)
    assert decoded.getpixel((8, 8)) == (255, 0, 0)


# --- the worker keeps serving ----------------------------------------------------------------


class CountingEngine:
    random_weights = False
    default_steps = 1

    def __init__(self) -> None:
        self.edits = 0

    def edit(
        self,
        request: EditRequest,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> EditResult:
        self.edits += 1
        buffer = io.BytesIO()
        request.images[0].save(buffer, format="JPEG")
        width, height = request.images[0].size
        return EditResult([EncodedImage(buffer.getvalue(), width, height, "image/jpeg")], seed=1)


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _claimed_png(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"\x00\x00\x00\x00IEND\xaeB`\x82"


HOSTILE_SOURCES = {
    "bomb": (_data_uri(_claimed_png(30000, 30000)), "too large"),
    "truncated": (_data_uri(_saved("PNG", (64, 64))[:60]), "truncated or corrupt"),
    "svg": (_data_uri(OUTSIDE_THE_ALLOW_LIST["svg"]), "not a JPEG, PNG"),
    "zero bytes": ("data:image/png;base64,", "holds no data"),
    "bad base64": ("data:image/png;base64,@@@@", "not valid base64"),
    "sliver": (_data_uri(_saved("PNG", (1, 500))), "aspect ratio"),
    "loopback": ("http://127.0.0.1:9/x.png", "loopback"),
}


def test_the_worker_fails_each_hostile_image_clearly_and_keeps_serving(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.db")
    engine = CountingEngine()
    runner = JobRunner(store, LocalFileStore(tmp_path / "files"), engine, fetcher(), worker_id="w")
    endpoint = "fal-ai/flux-pro/kontext/max"
    try:
        for name, (source, _) in HOSTILE_SOURCES.items():
            store.submit(
                NewJob(
                    id=name, endpoint=endpoint, input=EditInput(prompt="p", references=(source,))
                )
            )
        good = EditInput(prompt="p", references=(_data_uri(_saved("PNG", (16, 16))),))
        store.submit(NewJob(id="good", endpoint=endpoint, input=good))
        while runner.run_next():
            pass
    finally:
        runner.close()
    for name, (_, message) in HOSTILE_SOURCES.items():
        job = store.get(name)
        assert job is not None and job.status is JobStatus.FAILED, name
        assert job.error_type in ("image_load_error", "file_download_error"), name
        assert message in (job.error or ""), (name, job.error)
    done = store.get("good")
    assert done is not None and done.status is JobStatus.SUCCEEDED
    assert engine.edits == 1
    store.close()
