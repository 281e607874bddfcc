"""JSON is read within explicit limits (nesting depth, integer digits, finite numbers, NUL,
value count; docs/security.md) on every route and header that takes JSON, and each refusal
is a 4xx whose JSON body says what is allowed. Plus the smaller edges of issue 14: booleans
are not numbers, an empty id segment is a 404."""

from __future__ import annotations

import pytest
from http_support import IMAGE_URL, LOOPBACK, MAX, AppFactory, edit_body, submit
from starlette.testclient import TestClient

from kontext_server.domain.json_limits import (
    MAX_DEPTH,
    MAX_INT_DIGITS,
    MAX_VALUES,
    JSONLimitError,
    parse_json,
)
from kontext_server.store.sqlite import SQLiteJobStore

DEEP = "[" * 1000 + "]" * 1000
HUGE = "9" * 5000  # past Python's int-to-string limit (4300 digits)
VALID = f'"prompt": "p", "image_url": "{IMAGE_URL}"'

# (route, a valid body without its closing brace) for every route that reads a JSON body
JSON_ROUTES = [
    (f"/{MAX}", "{" + VALID),
    (f"/queue/{MAX}", "{" + VALID),
    (f"/run/{MAX}", "{" + VALID),
    ("/fal-ai/flux-pro/kontext/max/multi", '{"prompt": "p", "image_urls": ["' + IMAGE_URL + '"]'),
    ("/v1/flux-kontext-max", '{"prompt": "p", "input_image": "' + IMAGE_URL + '"'),
    ("/rest/storage/upload/initiate", '{"content_type": "image/png"'),
]
REFUSED_TAILS = {
    "deep nesting in an unknown field": f', "extra": {DEEP}}}',
    "deep nesting past the limit": ', "extra": '
    + "[" * (MAX_DEPTH + 1)
    + "]" * (MAX_DEPTH + 1)
    + "}",
    "a huge integer in an unknown field": f', "extra": {HUGE}}}',
    "a 65-digit integer": ', "extra": ' + "1" * (MAX_INT_DIGITS + 1) + "}",
    "a huge integer in a known field": f', "seed": {HUGE}}}',
    "infinity": ', "extra": 1e400}',
    "NaN": ', "extra": NaN}',
    "a lone surrogate": ', "extra": "\\ud800"}',
    "a NUL character": ', "extra": "a\\u0000b"}',
    "too many values": ', "extra": [' + ",".join(["0"] * MAX_VALUES) + "]}",
}


@pytest.mark.parametrize(("path", "start"), JSON_ROUTES)
@pytest.mark.parametrize("tail", REFUSED_TAILS.values(), ids=list(REFUSED_TAILS))
def test_json_past_a_limit_is_a_422_that_says_what_is_allowed(
    make_app: AppFactory, store: SQLiteJobStore, path: str, start: str, tail: str
) -> None:
    with TestClient(make_app(), client=LOOPBACK) as client:
        response = client.post(path, content=start + tail)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    [error] = response.json()["detail"]
    assert error["type"] == "json_invalid"
    assert f"nested at most {MAX_DEPTH} deep" in error["msg"]
    assert store.queue_depth() == 0


def test_the_whole_body_nested_a_thousand_deep_is_a_422(make_app: AppFactory) -> None:
    with TestClient(make_app(), client=LOOPBACK) as client:
        response = client.post(f"/{MAX}", content=DEEP)
    assert response.status_code == 422
    assert f"nested more than {MAX_DEPTH} deep" in response.json()["detail"][0]["msg"]


def test_json_within_the_limits_is_read(make_app: AppFactory, store: SQLiteJobStore) -> None:
    nested = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)  # the body object is one level
    body = "{" + VALID + f', "extra": {nested}, "big": {"9" * MAX_INT_DIGITS}, "seed": 7}}'
    with TestClient(make_app(), client=LOOPBACK) as client:
        response = client.post(f"/{MAX}", content=body)
    assert response.status_code == 200, response.text
    job = store.get(response.json()["request_id"])
    assert job is not None and job.input.seed == 7


@pytest.mark.parametrize(
    "value",
    [
        '{"expiration_duration_seconds": ' + HUGE + "}",
        '{"expiration_duration_seconds": 1e400}',
        DEEP,
        '{"a":' * 1000 + "1" + "}" * 1000,
        HUGE,
    ],
)
def test_a_lifecycle_header_json_past_the_limits_is_ignored_never_refused(
    make_app: AppFactory, store: SQLiteJobStore, value: str
) -> None:
    with TestClient(make_app(), client=LOOPBACK) as client:
        answer = submit(client, headers={"x-fal-object-lifecycle-preference": value})
        token = client.post("/rest/storage/auth/token").json()["token"]
        upload = client.post(
            "/cdn/files/upload",
            content=b"bytes",
            headers={"authorization": f"Bearer {token}", "x-fal-object-lifecycle": value},
        )
    assert store.get(answer["request_id"]) is not None
    assert upload.status_code == 200, upload.text


@pytest.mark.parametrize(
    ("field", "path"),
    [
        ("num_images", f"/{MAX}"),
        ("guidance_scale", f"/{MAX}"),
        ("seed", f"/{MAX}"),
        ("num_inference_steps", "/fal-ai/flux-kontext/dev"),
    ],
)
def test_a_boolean_is_not_a_number(make_app: AppFactory, field: str, path: str) -> None:
    with TestClient(make_app(), client=LOOPBACK) as client:
        response = client.post(path, json=edit_body(**{field: True}))
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field]
    assert error["msg"].endswith("; got True")


def test_a_boolean_is_not_a_bfl_number(make_app: AppFactory) -> None:
    body = {"prompt": "p", "input_image": IMAGE_URL, "safety_tolerance": True, "seed": False}
    with TestClient(make_app(), client=LOOPBACK) as client:
        response = client.post("/v1/flux-kontext-max", json=body)
    assert response.status_code == 422
    assert {tuple(e["loc"]) for e in response.json()["detail"]} == {
        ("body", "safety_tolerance"),
        ("body", "seed"),
    }


def test_numbers_in_strings_stay_accepted(make_app: AppFactory) -> None:
    with TestClient(make_app(), client=LOOPBACK) as client:
        response = client.post(f"/{MAX}", json=edit_body(guidance_scale="3", num_images="2"))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/fal-ai/flux-pro/requests//status", {"detail": "Request not found"}),
        ("GET", "/queue/fal-ai/flux-pro/requests//status", {"detail": "Request not found"}),
        ("GET", "/fal-ai/flux-pro/requests//status/stream", {"detail": "Request not found"}),
        ("GET", "/fal-ai/flux-pro/requests/", {"detail": "Request not found"}),
        ("PUT", "/fal-ai/flux-pro/requests//cancel", {"status": "NOT_FOUND"}),
    ],
)
def test_an_empty_id_segment_is_a_404(
    make_app: AppFactory, method: str, path: str, body: dict[str, str]
) -> None:
    with TestClient(make_app(), client=LOOPBACK) as client:
        response = client.request(method, path)
    assert response.status_code == 404
    assert response.json() == body


@pytest.mark.parametrize(
    "request_id",
    [" {id}", "{id} ", "{id}%09", "%20{id}", "{ID}", "{id}x", "é", "%ff"],
)
def test_an_id_not_of_our_format_is_a_404_never_echoed(
    make_app: AppFactory, request_id: str
) -> None:
    with TestClient(make_app(), client=LOOPBACK) as client:
        real = submit(client)["request_id"]
        odd = request_id.format(id=real, ID=real.upper())
        for method, suffix in (("GET", "/status"), ("GET", ""), ("PUT", "/cancel")):
            response = client.request(method, f"/fal-ai/flux-pro/requests/{odd}{suffix}")
            assert response.status_code == 404, (odd, suffix, response.text)
            assert "x-fal-request-id" not in response.headers
        bfl = client.get("/v1/get_result", params={"id": odd})
    assert bfl.status_code == 404
    assert bfl.json()["id"] is None


def test_an_upload_url_not_of_our_format_is_a_404(make_app: AppFactory) -> None:
    with TestClient(make_app(), client=LOOPBACK) as client:
        response = client.put("/cdn/uploads/not a ticket", content=b"x")
    assert response.status_code == 404
    assert response.json() == {"detail": "Upload URL not found"}


@pytest.mark.parametrize(
    "text",
    ["[" * 33 + "]" * 33, HUGE, "NaN", "1e400", '"\\udc00"', '"\\u0000"', "{} x"],
)
def test_parse_json_refuses_with_a_reason(text: str) -> None:
    with pytest.raises(JSONLimitError) as refused:
        parse_json(text)
    assert str(refused.value)


def test_parse_json_keeps_the_last_of_duplicate_keys() -> None:
    assert parse_json('{"a": 1, "a": 2}') == {"a": 2}
