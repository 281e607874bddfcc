"""Property-based raw-HTTP fuzzing of the real app on loopback (uvicorn in a thread, a real
SQLite or PostgreSQL store, local files): whatever arrives, an answer arrives, it is never a
5xx, and it is JSON where the route answers JSON.

* generated JSON bodies for every route that reads JSON (fal queue and run submits, BFL,
  storage initiate): deep nesting, integers of thousands of digits, ``NaN``/``Infinity``/
  ``1e400``, lone surrogates, NUL characters, duplicate keys, wrong types in known fields,
  bytes that are not UTF-8;
* generated values for every header the server reads;
* generated path segments (and the BFL ``id``) for every route that takes an id.

Requests are written byte by byte on a socket and answers parsed with h11 (``raw_http.py``),
so a dropped connection or an illegal answer fails the property. Bounded for CI: each test
draws ``FUZZ_EXAMPLES`` requests (about 20 s for the whole file on 2 cores).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
from fastapi import FastAPI
from http_support import IMAGE_URL, MAX, AppFactory, LiveServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from raw_http import Answer, exchange

from contract.pg_cluster import PgCluster
from kontext_server.config import Settings
from kontext_server.files.local import LocalFileStore
from kontext_server.http.app import create_app
from kontext_server.store.postgres import PostgresJobStore
from kontext_server.webhooks.signing import WebhookSigner

FUZZ_EXAMPLES = 150
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
UNKNOWN_ID = "0190b1f2-7c3a-7d4e-8f60-123456789abc"  # our format, no such request

# --- JSON text, including what json.dumps would never write -------------------------------------

KNOWN_FIELDS = [
    "prompt",
    "image_url",
    "image_urls",
    "seed",
    "guidance_scale",
    "num_images",
    "sync_mode",
    "safety_tolerance",
    "output_format",
    "aspect_ratio",
    "enhance_prompt",
    "num_inference_steps",
    "resolution_mode",
    "acceleration",
    "enable_safety_checker",
    "input_image",
    "input_image_2",
    "prompt_upsampling",
    "webhook_url",
    "webhook_secret",
    "content_type",
    "file_name",
]
ODD_NUMBERS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e999",
    "1E-400",
    "-0",
    "0.0e0",
    "1.7976931348623157e308",
    "9223372036854775808",
    "-9223372036854775809",
    "4.0000000000000000000000000001",
]
ODD_STRINGS = [
    '"\\ud800"',
    '"\\udfff tail"',
    '"\\ud83d\\ude00"',
    '"a\\u0000b"',
    '"\\u0000"',
    '"\\\\"',
    '""',
    '"   "',
    '"data:image/png;base64,AAAA"',
    '"http://[fe80::1%25lo]/x.png"',
    '"http://127.0.0.1/files/x"',
    '"16:9"',
    '"0:0"',
    '"9999:1"',
]


def huge_integer() -> st.SearchStrategy[str]:
    return st.builds(
        lambda digits, sign: sign + "9" * digits,
        st.sampled_from([20, 65, 300, 4301, 5000, 20000]),
        st.sampled_from(["", "-"]),
    )


def deep(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``[[[...x...]]]`` or ``{"a":{"a":...x...}}``, from a few levels to thousands."""
    depth = st.sampled_from([2, 31, 32, 33, 200, 201, 1000, 5000])
    arrays = st.builds(lambda n, x: "[" * n + x + "]" * n, depth, inner)
    objects = st.builds(lambda n, x: '{"a":' * n + x + "}" * n, depth, inner)
    return arrays | objects


SCALARS = st.one_of(
    st.sampled_from(["null", "true", "false"]),
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(ODD_NUMBERS),
    huge_integer(),
    st.text(max_size=30).map(json.dumps),
    st.text(max_size=30).map(lambda text: json.dumps(text, ensure_ascii=False)),
    st.sampled_from(ODD_STRINGS),
)
KEYS = st.sampled_from(KNOWN_FIELDS).map(json.dumps) | st.sampled_from(ODD_STRINGS)


def containers(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    arrays = st.lists(children, max_size=4).map(lambda items: "[" + ",".join(items) + "]")
    # pairs, not a dict: the same key may come twice
    objects = st.lists(st.tuples(KEYS, children), max_size=5).map(
        lambda pairs: "{" + ",".join(f"{key}:{value}" for key, value in pairs) + "}"
    )
    return arrays | objects


VALUES = st.recursive(SCALARS, containers, max_leaves=12) | deep(SCALARS)


def with_field(base: dict[str, Any]) -> st.SearchStrategy[str]:
    """``base`` (a valid body) with one field, known or not, set to any generated value."""

    def build(key: str, value: str, first: bool) -> str:
        rest = ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in base.items())
        pair = f"{key}:{value}"
        return "{" + (f"{pair},{rest}" if first else f"{rest},{pair}") + "}"

    return st.builds(build, KEYS, VALUES, st.booleans())


def bodies(base: dict[str, Any]) -> st.SearchStrategy[bytes]:
    text = VALUES | with_field(base) | deep(st.just(json.dumps(base)))
    encoded = text.map(lambda body: body.encode("utf-8", "surrogatepass"))
    return encoded | st.binary(max_size=200) | st.just(b"")


# --- header values: any bytes that may appear in a header on the wire ---------------------------

HEADER_BYTES = st.binary(max_size=120).map(
    lambda raw: bytes(b for b in raw if b == 0x09 or 0x20 <= b <= 0x7E or b >= 0x80).strip()
)
INTERESTING_HEADER_VALUES = [
    b'{"expiration_duration_seconds": ' + b"9" * 5000 + b"}",
    b'{"expiration_duration_seconds": 1e400}',
    b'{"expiration_duration_seconds": NaN}',
    b'{"expiration_duration_seconds": true}',
    b"[" * 2000 + b"]" * 2000,
    b'{"a":' * 1000 + b"1" + b"}" * 1000,
    b"9" * 5000,
    b"-1",
    b"0",
    b"1e999",
    b"nan",
    b"low",
    b"normal",
    b"Key " + b"x" * 500,
    b"Bearer \xff\xfe",
    b"https://queue.fal.run/fal-ai/flux-pro/kontext/max",
    b"https://rest.fal.ai/storage/upload/initiate",
    b"https://v3.fal.media/files/upload",
    b"https://evil.example/",
    b"\xe2\x80\x8b",
]
READ_HEADERS = [
    "authorization",
    "x-key",
    "x-fal-queue-priority",
    "x-fal-request-timeout",
    "x-fal-request-start-timeout",
    "x-fal-no-retry",
    "x-fal-runner-hint",
    "x-fal-object-lifecycle-preference",
    "x-fal-object-lifecycle",
    "idempotency-key",
    "content-type",
    "accept",
    "origin",
    "x-fal-file-name",
    "x-fal-target-url",
    "x-forwarded-for",
    "x-forwarded-proto",
]
# --- path segments ----------------------------------------------------------------------------

INTERESTING_SEGMENTS = [
    "",
    "%20" + UNKNOWN_ID,
    UNKNOWN_ID + "%20",
    UNKNOWN_ID.upper(),
    UNKNOWN_ID + "%0d%0aSet-Cookie:%20x=1",
    "%00",
    "%ff%fe",
    "..",
    "%2e%2e",
    "%2F",
    UNKNOWN_ID,
    "x" * 5000,
    "%e2%80%8b",
]
SEGMENTS = st.one_of(
    st.text(max_size=80).map(lambda text: quote(text, safe="")),
    st.binary(max_size=40).map(lambda raw: quote(raw, safe="")),
    st.sampled_from(INTERESTING_SEGMENTS),
)


def id_targets(segment: str) -> list[tuple[str, str]]:
    """(method, path) of every route that takes an id, with ``segment`` as the id."""
    targets = []
    for prefix in ("", "/queue"):
        for owner_alias in ("fal-ai/flux-pro", "fal-ai/flux-kontext", MAX):
            base = f"{prefix}/{owner_alias}/requests/{segment}"
            targets += [
                ("GET", f"{base}/status"),
                ("GET", f"{base}/status/stream"),
                ("GET", base),
                ("PUT", f"{base}/cancel"),
            ]
    targets += [
        ("GET", f"/files/{segment}"),
        ("GET", f"/files/uploads/{segment}/x.png"),
        ("PUT", f"/cdn/uploads/{segment}"),
        ("GET", f"/v1/get_result?id={segment}"),
    ]
    return targets


# --- the property -----------------------------------------------------------------------------


def check(answer: Answer, method: str, what: object) -> None:
    assert answer.status < 500, (answer.status, answer.body[:300], what)
    if method != "HEAD" and answer.status not in (204, 304):
        assert answer.is_json(), (answer.status, answer.content_type, answer.body[:200], what)
        answer.json()


@pytest.fixture
def live(make_app: AppFactory) -> Iterator[tuple[str, int]]:
    """The app on loopback, authentication off (so requests reach the handlers)."""
    with LiveServer(make_app(insecure_no_auth=True, fetch_allow_hosts=[])) as server:
        host, port = server.url.removeprefix("http://").split(":")
        yield host, int(port)


@pytest.fixture
def live_run_refused(make_app: AppFactory) -> Iterator[tuple[str, int]]:
    """max_queue_size=0: a valid ``/run/`` body is refused (429) at once instead of waiting
    for a worker that does not exist here."""
    app = make_app(insecure_no_auth=True, max_queue_size=0)
    with LiveServer(app) as server:
        host, port = server.url.removeprefix("http://").split(":")
        yield host, int(port)


JSON_ROUTES = [
    ("/" + MAX, {"prompt": "p", "image_url": IMAGE_URL}),
    ("/queue/fal-ai/flux-pro/kontext/max/multi", {"prompt": "p", "image_urls": [IMAGE_URL]}),
    ("/fal-ai/flux-kontext/dev", {"prompt": "p", "image_url": IMAGE_URL}),
    ("/fal-ai/flux-pro/kontext/max/text-to-image", {"prompt": "p"}),
    ("/v1/flux-kontext-max", {"prompt": "p", "input_image": IMAGE_URL}),
    ("/rest/storage/upload/initiate", {"content_type": "image/png", "file_name": "a.png"}),
]


@pytest.mark.timeout(300)
def test_no_json_body_breaks_a_json_route(live: tuple[str, int]) -> None:
    routes = st.sampled_from(JSON_ROUTES).flatmap(
        lambda route: st.tuples(st.just(route[0]), bodies(route[1]))
    )

    @FUZZ_SETTINGS
    @given(route_and_body=routes)
    def fuzz(route_and_body: tuple[str, bytes]) -> None:
        path, body = route_and_body
        answer = exchange(
            live, "POST", path.encode(), [(b"content-type", b"application/json")], body
        )
        check(answer, "POST", (path, body[:200]))

    fuzz()


@pytest.mark.timeout(300)
def test_no_json_body_breaks_a_sync_run(live_run_refused: tuple[str, int]) -> None:
    @FUZZ_SETTINGS
    @given(body=bodies({"prompt": "p", "image_url": IMAGE_URL}))
    def fuzz(body: bytes) -> None:
        answer = exchange(live_run_refused, "POST", f"/run/{MAX}".encode(), [], body)
        check(answer, "POST", body[:200])

    fuzz()


HEADER_TARGETS = [
    ("POST", "/" + MAX, json.dumps({"prompt": "p", "image_url": IMAGE_URL})),
    ("POST", "/v1/flux-kontext-max", json.dumps({"prompt": "p", "input_image": IMAGE_URL})),
    ("POST", "/rest/storage/upload/initiate", "{}"),
    ("POST", "/rest/storage/auth/token", ""),
    ("POST", "/cdn/files/upload", "bytes"),
    ("POST", "/proxy", json.dumps({"prompt": "p", "image_url": IMAGE_URL})),
    ("GET", f"/fal-ai/flux-pro/requests/{UNKNOWN_ID}/status"),
    ("GET", f"/v1/get_result?id={UNKNOWN_ID}"),
]


def with_examples(
    values: list[Any], name: str = "value", **others: Any
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``@example(name=v, **others)`` for each of ``values``: tried on every run, besides
    the generated ones."""

    def decorate(test: Callable[..., None]) -> Callable[..., None]:
        for value in values:
            test = example(**{name: value}, **others)(test)
        return test

    return decorate


@pytest.mark.timeout(300)
def test_no_header_value_breaks_a_route(live: tuple[str, int]) -> None:
    """Each value goes, in turn, into every header the server reads on every route that
    reads headers (one request each, so that a refusal of one header does not hide how the
    next is read)."""

    @settings(FUZZ_SETTINGS, max_examples=FUZZ_EXAMPLES // 8)
    @with_examples(INTERESTING_HEADER_VALUES)
    @given(value=HEADER_BYTES)
    def fuzz(value: bytes) -> None:
        for method, path, *body in HEADER_TARGETS:
            payload = body[0].encode() if body else b""
            for name in READ_HEADERS:
                answer = exchange(live, method, path.encode(), [(name.encode(), value)], payload)
                check(answer, method, (path, name, value[:100]))

    fuzz()


@pytest.mark.timeout(300)
def test_no_id_in_a_path_breaks_a_route(live: tuple[str, int]) -> None:
    """Each segment goes, in turn, into every route that takes an id, with the route's own
    method and with another one."""
    methods = st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD"])

    @settings(FUZZ_SETTINGS, max_examples=FUZZ_EXAMPLES // 4)
    @with_examples(INTERESTING_SEGMENTS, name="segment", other_method="DELETE")
    @given(segment=SEGMENTS, other_method=methods)
    def fuzz(segment: str, other_method: str) -> None:
        for method, path in id_targets(segment):
            for verb in (method, other_method):
                answer = exchange(live, verb, path.encode("ascii"), [])
                check(answer, verb, (verb, path[:200]))
                if verb == method and answer.status == 404:
                    # an id is echoed only when it is one of ours
                    echoed = answer.headers.get("x-fal-request-id")
                    assert echoed in (None, UNKNOWN_ID.encode()), echoed

    fuzz()


# --- the same bodies against PostgreSQL: what it cannot store must be refused before ---------


@pytest.fixture
def pg_app(pg_cluster: PgCluster, tmp_path: Any) -> Iterator[FastAPI]:
    store = PostgresJobStore(pg_cluster.create_database("fuzz_http"), pool_max=4)
    try:
        yield create_app(
            Settings(data_dir=tmp_path / "data", insecure_no_auth=True),
            store,
            LocalFileStore(tmp_path / "files"),
            signer=WebhookSigner.load_or_create(tmp_path / "key.pem"),
            run_background=False,
        )
    finally:
        store.close()


@pytest.mark.timeout(300)
def test_no_json_body_breaks_a_submit_on_postgresql(pg_app: FastAPI) -> None:
    base = {"prompt": "p", "image_url": IMAGE_URL}
    with LiveServer(pg_app) as server:
        host, port = server.url.removeprefix("http://").split(":")

        @settings(FUZZ_SETTINGS, max_examples=FUZZ_EXAMPLES // 2)
        @given(body=bodies(base), webhook=SEGMENTS)
        def fuzz(body: bytes, webhook: str) -> None:
            target = f"/{MAX}?fal_webhook=https://example.com/{webhook}".encode()
            answer = exchange((host, int(port)), "POST", target, [], body)
            check(answer, "POST", body[:200])

        fuzz()
