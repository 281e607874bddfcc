"""Validation of every field of PROTOCOL.md §8: 422 with a FastAPI-style detail list whose
messages say what is allowed."""

from __future__ import annotations

from typing import Any

import pytest
from http_support import IMAGE_URL, MAX, MULTI, edit_body, submit, tiny_png_data_uri
from starlette.testclient import TestClient

from kontext_server.http.fal.schemas import MAX_IMAGE_URLS, PROMPT_MAX_CHARS, MaxInput


def errors_of(client: TestClient, body: Any, path: str = MAX) -> list[dict[str, Any]]:
    response = client.post(f"/{path}", json=body)
    assert response.status_code == 422, response.text
    detail: list[dict[str, Any]] = response.json()["detail"]
    return detail


def the_error(client: TestClient, body: Any, path: str = MAX) -> dict[str, Any]:
    errors = errors_of(client, body, path)
    assert len(errors) == 1, errors
    return errors[0]


def test_the_specs_aspect_ratio_example_gets_a_message_that_says_what_is_allowed(
    client: TestClient,
) -> None:
    error = the_error(client, edit_body(aspect_ratio="string"))

    assert error["loc"] == ["body", "aspect_ratio"]
    assert error["msg"] == (
        "aspect_ratio must be a ratio W:H between 21:9 and 9:21 (e.g. 16:9, 4:3, 1:1, 9:16); "
        "got 'string'"
    )


@pytest.mark.parametrize(
    "ratio", ["21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21", "5:4", "7:3"]
)
def test_max_accepts_any_ratio_between_21_9_and_9_21(client: TestClient, ratio: str) -> None:
    submit(client, body=edit_body(aspect_ratio=ratio))


@pytest.mark.parametrize("ratio", ["22:9", "9:22", "0:1", "16/9", "1:1:1", "", 16])
def test_max_refuses_ratios_outside_21_9_to_9_21(client: TestClient, ratio: Any) -> None:
    error = the_error(client, edit_body(aspect_ratio=ratio))

    assert error["msg"].startswith("aspect_ratio must be a ratio W:H between 21:9 and 9:21")


def test_multi_aspect_ratio_is_the_enum_of_nine(client: TestClient) -> None:
    body = {"prompt": "x", "image_urls": [IMAGE_URL], "aspect_ratio": "5:4"}

    error = the_error(client, body, MULTI)

    assert error["loc"] == ["body", "aspect_ratio"]
    assert error["msg"] == (
        "aspect_ratio must be one of 21:9, 16:9, 4:3, 3:2, 1:1, 2:3, 3:4, 9:16, 9:21; got '5:4'"
    )
    submit(client, body={**body, "aspect_ratio": "9:21"}, path=MULTI)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("prompt", "", "prompt must not be empty"),
        ("prompt", "   ", "prompt must not be empty"),
        ("prompt", "x" * (PROMPT_MAX_CHARS + 1), f"at most {PROMPT_MAX_CHARS} characters"),
        ("prompt", 7, "prompt must be a non-empty string"),
        ("image_url", "ftp://example.com/a.png", "image_url"),
        ("image_url", "not a url", "image_url"),
        ("image_url", "data:text/plain;base64,aGVsbG8=", "image"),
        ("seed", -1, "0 <= seed < 2**63"),
        ("seed", 2**63, "0 <= seed < 2**63"),
        ("seed", 1.5, "seed must be an integer"),
        ("guidance_scale", 0.5, "guidance_scale must be a number from 1 to 20"),
        ("guidance_scale", 20.5, "from 1 to 20"),
        ("guidance_scale", "lots", "from 1 to 20"),
        ("sync_mode", "maybe", "sync_mode must be true or false"),
        ("num_images", 0, "num_images must be an integer from 1 to 4"),
        ("num_images", 5, "from 1 to 4"),
        ("safety_tolerance", "7", 'safety_tolerance must be one of "1" to "6"'),
        ("safety_tolerance", 0, 'one of "1" to "6"'),
        ("safety_tolerance", True, 'one of "1" to "6"'),
        ("output_format", "webp", 'output_format must be "jpeg" or "png"'),
        ("enhance_prompt", "very", "enhance_prompt must be true or false"),
    ],
)
def test_each_rule_of_max_answers_a_422_that_says_what_is_allowed(
    client: TestClient, field: str, value: Any, expected: str
) -> None:
    error = the_error(client, edit_body(**{field: value}))

    assert error["loc"][:2] == ["body", field]
    assert expected in error["msg"]


@pytest.mark.parametrize(("value", "stored"), [("1", "1"), (6, "6"), (" 3 ", "3")])
def test_safety_tolerance_accepts_strings_and_integers_and_stores_a_string(
    value: Any, stored: str
) -> None:
    assert MaxInput.model_validate(edit_body(safety_tolerance=value)).safety_tolerance == stored


def test_seed_bounds_are_inclusive_of_zero_and_below_two_to_the_63(client: TestClient) -> None:
    submit(client, body=edit_body(seed=0))
    submit(client, body=edit_body(seed=2**63 - 1))


@pytest.mark.parametrize("missing", ["prompt", "image_url"])
def test_a_missing_required_field_is_named_with_its_rule(client: TestClient, missing: str) -> None:
    body = edit_body()
    del body[missing]

    error = the_error(client, body)

    assert error["loc"] == ["body", missing]
    assert error["type"] == "missing"
    assert error["msg"].startswith(f"{missing} is required: {missing} must be")


def test_multi_needs_at_least_one_image_url(client: TestClient) -> None:
    error = the_error(client, {"prompt": "x", "image_urls": []}, MULTI)

    assert error["loc"] == ["body", "image_urls"]
    assert f"a list of 1 to {MAX_IMAGE_URLS}" in error["msg"]


def test_multi_caps_the_number_of_image_urls(client: TestClient) -> None:
    urls = [IMAGE_URL] * (MAX_IMAGE_URLS + 1)

    error = the_error(client, {"prompt": "x", "image_urls": urls}, MULTI)

    assert f"a list of 1 to {MAX_IMAGE_URLS}" in error["msg"]


def test_multi_checks_each_image_url_and_points_at_it(client: TestClient) -> None:
    body = {"prompt": "x", "image_urls": [IMAGE_URL, "gopher://old.net/x"]}

    error = the_error(client, body, MULTI)

    assert error["loc"] == ["body", "image_urls", 1]


def test_data_uri_images_are_accepted_and_oversized_ones_refused_before_decoding(
    client: TestClient, make_app: Any, settings: Any
) -> None:
    submit(client, body=edit_body(image_url=tiny_png_data_uri()))
    small = settings.model_copy(update={"max_image_bytes": 16})
    with TestClient(make_app(settings=small), client=("127.0.0.1", 1)) as capped:
        error = the_error(capped, edit_body(image_url=tiny_png_data_uri()))
    assert error["loc"] == ["body", "image_url"]


def test_several_errors_are_reported_together(client: TestClient) -> None:
    errors = errors_of(client, {"prompt": "", "image_url": IMAGE_URL, "num_images": 9})

    assert {tuple(error["loc"]) for error in errors} == {("body", "prompt"), ("body", "num_images")}


def test_malformed_json_is_a_422_too(client: TestClient) -> None:
    response = client.post(
        f"/{MAX}", content=b'{"prompt": "x", ', headers={"content-type": "application/json"}
    )

    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["type"] == "json_invalid"
    assert "not valid JSON" in error["msg"]


def test_a_body_that_is_not_an_object_says_what_is_expected(client: TestClient) -> None:
    error = the_error(client, ["prompt", "image_url"])

    assert error["loc"] == ["body"]
    assert "JSON object with at least prompt and image_url" in error["msg"]


def test_unknown_fields_are_ignored(client: TestClient) -> None:
    submit(client, body=edit_body(loras=[], num_inference_steps=50))


def test_a_bad_webhook_url_is_a_422(client: TestClient) -> None:
    response = client.post(f"/{MAX}?fal_webhook=javascript:alert(1)", json=edit_body())

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "fal_webhook"]
