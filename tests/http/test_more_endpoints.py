"""fal's other Kontext endpoints on the same engine (PROTOCOL.md §8 "Related fal endpoints"):
pro and pro multi, the two text-to-image endpoints and [dev]. Submit shape, URLs under
owner/alias, defaults as stored, and 422 messages that say what is allowed."""

from __future__ import annotations

from typing import Any

import pytest
from http_support import IMAGE_URL, PlayedWorker, submit
from starlette.testclient import TestClient

from kontext_server.domain.editing import EditInput
from kontext_server.http.fal.schemas import ENDPOINTS, RESOLUTION_MODES
from kontext_server.store.sqlite import SQLiteJobStore

PRO = "fal-ai/flux-pro/kontext"
PRO_MULTI = "fal-ai/flux-pro/kontext/multi"
MAX_T2I = "fal-ai/flux-pro/kontext/max/text-to-image"
PRO_T2I = "fal-ai/flux-pro/kontext/text-to-image"
DEV = "fal-ai/flux-kontext/dev"

# endpoint -> (a minimal valid body, the owner/alias its request URLs use)
MINIMAL = {
    PRO: ({"prompt": "Put a donut next to the flour.", "image_url": IMAGE_URL}, "fal-ai/flux-pro"),
    PRO_MULTI: ({"prompt": "Put them together.", "image_urls": [IMAGE_URL]}, "fal-ai/flux-pro"),
    MAX_T2I: ({"prompt": "A donut on a table."}, "fal-ai/flux-pro"),
    PRO_T2I: ({"prompt": "A donut on a table."}, "fal-ai/flux-pro"),
    DEV: ({"prompt": "Make it snow.", "image_url": IMAGE_URL}, "fal-ai/flux-kontext"),
}
NEW_ENDPOINTS = list(MINIMAL)


def errors_of(client: TestClient, path: str, body: Any) -> list[dict[str, Any]]:
    response = client.post(f"/{path}", json=body)
    assert response.status_code == 422, response.text
    detail: list[dict[str, Any]] = response.json()["detail"]
    return detail


def the_error(client: TestClient, path: str, body: Any) -> dict[str, Any]:
    errors = errors_of(client, path, body)
    assert len(errors) == 1, errors
    return errors[0]


def test_every_new_endpoint_is_served() -> None:
    assert set(NEW_ENDPOINTS) <= set(ENDPOINTS)


@pytest.mark.parametrize("endpoint", NEW_ENDPOINTS)
def test_submit_answers_urls_under_the_owner_alias_that_lead_back(
    client: TestClient, endpoint: str
) -> None:
    body, owner_alias = MINIMAL[endpoint]

    answer = submit(client, body=body, path=endpoint)

    base = f"http://testserver/{owner_alias}/requests/{answer['request_id']}"
    assert answer["status"] == "IN_QUEUE"
    assert answer["response_url"] == base
    assert answer["status_url"] == f"{base}/status"
    assert answer["cancel_url"] == f"{base}/cancel"
    assert client.get(answer["status_url"]).json()["status"] == "IN_QUEUE"
    # the full endpoint path before /requests/ works too
    full = client.get(f"/{endpoint}/requests/{answer['request_id']}/status")
    assert full.status_code == 202


def test_a_dev_request_is_not_found_under_the_pro_owner_alias(client: TestClient) -> None:
    body, _ = MINIMAL[DEV]
    request_id = submit(client, body=body, path=DEV)["request_id"]

    response = client.get(f"/fal-ai/flux-pro/requests/{request_id}/status")

    assert response.status_code == 404


@pytest.mark.parametrize("endpoint", NEW_ENDPOINTS)
def test_submit_under_the_queue_prefix_and_cancel_work(client: TestClient, endpoint: str) -> None:
    body, owner_alias = MINIMAL[endpoint]

    answer = submit(client, body=body, path=f"queue/{endpoint}")

    assert answer["cancel_url"].startswith(f"http://testserver/queue/{owner_alias}/requests/")
    assert client.put(answer["cancel_url"]).status_code == 202


def test_pro_endpoints_store_the_same_input_as_max(
    client: TestClient, store: SQLiteJobStore
) -> None:
    body = {"prompt": "x", "image_url": IMAGE_URL, "aspect_ratio": "5:4", "safety_tolerance": 5}

    pro = store.get(submit(client, body=body, path=PRO)["request_id"])
    max_ = store.get(submit(client, body=body, path="fal-ai/flux-pro/kontext/max")["request_id"])

    assert pro is not None and max_ is not None
    assert pro.endpoint == PRO
    assert pro.input == max_.input
    assert pro.input.safety_tolerance == 5


def test_pro_multi_aspect_ratio_is_the_enum_of_nine(client: TestClient) -> None:
    body = {"prompt": "x", "image_urls": [IMAGE_URL], "aspect_ratio": "5:4"}

    error = the_error(client, PRO_MULTI, body)

    assert error["loc"] == ["body", "aspect_ratio"]
    assert error["msg"] == (
        "aspect_ratio must be one of 21:9, 16:9, 4:3, 3:2, 1:1, 2:3, 3:4, 9:16, 9:21; got '5:4'"
    )


@pytest.mark.parametrize("endpoint", [PRO, DEV])
def test_single_image_endpoints_require_image_url(client: TestClient, endpoint: str) -> None:
    error = the_error(client, endpoint, {"prompt": "x"})

    assert error["loc"] == ["body", "image_url"]
    assert error["msg"].startswith("image_url is required: image_url must be an http(s) URL")


# --- text-to-image --------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", [MAX_T2I, PRO_T2I])
def test_text_to_image_stores_the_defaults_and_needs_no_image(
    client: TestClient, store: SQLiteJobStore, endpoint: str
) -> None:
    job = store.get(submit(client, body={"prompt": "A donut."}, path=endpoint)["request_id"])

    assert job is not None
    assert job.input == EditInput(
        prompt="A donut.",
        references=(),
        seed=None,
        guidance_scale=3.5,
        inline_output=False,
        num_images=1,
        safety_tolerance=2,
        output_format="jpeg",
        aspect_ratio="1:1",
        enhance_prompt=False,
    )


def test_text_to_image_null_aspect_ratio_means_its_default(
    client: TestClient, store: SQLiteJobStore
) -> None:
    body = {"prompt": "A donut.", "aspect_ratio": None}

    job = store.get(submit(client, body=body, path=MAX_T2I)["request_id"])

    assert job is not None and job.input.aspect_ratio == "1:1"


def test_text_to_image_ignores_an_image_url(client: TestClient, store: SQLiteJobStore) -> None:
    body = {"prompt": "A donut.", "image_url": IMAGE_URL}

    job = store.get(submit(client, body=body, path=MAX_T2I)["request_id"])

    assert job is not None and job.input.references == ()


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (
            {},
            "prompt",
            "prompt is required: prompt must be a non-empty string of at most 4000 "
            "characters (the description of the image)",
        ),
        ({"prompt": "  "}, "prompt", "prompt must not be empty: describe the image to generate"),
        (
            {"prompt": "x", "aspect_ratio": "5:4"},
            "aspect_ratio",
            "aspect_ratio must be one of 21:9, 16:9, 4:3, 3:2, 1:1, 2:3, 3:4, 9:16, 9:21 "
            "(default 1:1); got '5:4'",
        ),
        (
            {"prompt": "x", "num_images": 5},
            "num_images",
            "num_images must be an integer from 1 to 4; got 5",
        ),
        (
            {"prompt": "x", "guidance_scale": 0},
            "guidance_scale",
            "guidance_scale must be a number from 1 to 20; got 0",
        ),
        (
            {"prompt": "x", "safety_tolerance": 7},
            "safety_tolerance",
            'safety_tolerance must be one of "1" to "6"',
        ),
        (
            {"prompt": "x", "output_format": "webp"},
            "output_format",
            'output_format must be "jpeg" or "png"',
        ),
    ],
)
def test_text_to_image_validation_says_what_is_allowed(
    client: TestClient, body: dict[str, Any], field: str, message: str
) -> None:
    error = the_error(client, MAX_T2I, body)

    assert error["loc"] == ["body", field]
    assert error["msg"].startswith(message)


def test_text_to_image_body_must_be_an_object(client: TestClient) -> None:
    error = the_error(client, PRO_T2I, [1])

    assert error["msg"] == "the request body must be a JSON object with at least prompt; got [1]"


# --- dev --------------------------------------------------------------------------------------


def test_dev_stores_its_defaults(client: TestClient, store: SQLiteJobStore) -> None:
    body, _ = MINIMAL[DEV]

    job = store.get(submit(client, body=body, path=DEV)["request_id"])

    assert job is not None
    assert job.endpoint == DEV
    assert job.input == EditInput(  # resolution_mode "match_input": the input's own size
        prompt="Make it snow.",
        references=(IMAGE_URL,),
        num_inference_steps=28,
        seed=None,
        guidance_scale=2.5,
        inline_output=False,
        num_images=1,
        output_format="jpeg",
        enhance_prompt=False,
        aspect_ratio=None,
        match_input_size=True,
        acceleration="none",
    )


@pytest.mark.parametrize("mode", RESOLUTION_MODES)
def test_dev_accepts_every_resolution_mode(client: TestClient, mode: str) -> None:
    body, _ = MINIMAL[DEV]

    submit(client, body={**body, "resolution_mode": mode}, path=DEV)


@pytest.mark.parametrize("acceleration", ["none", "regular", "high"])
def test_dev_accepts_every_acceleration(
    client: TestClient, store: SQLiteJobStore, acceleration: str
) -> None:
    body, _ = MINIMAL[DEV]

    answer = submit(client, body={**body, "acceleration": acceleration}, path=DEV)

    job = store.get(answer["request_id"])
    assert job is not None and job.input.acceleration == acceleration


def test_dev_keeps_the_steps_and_guidance_it_was_given(
    client: TestClient, store: SQLiteJobStore
) -> None:
    body, _ = MINIMAL[DEV]
    fields = {"num_inference_steps": 50, "enable_safety_checker": False, "guidance_scale": 7}

    job = store.get(submit(client, body={**body, **fields}, path=DEV)["request_id"])

    assert job is not None
    assert job.input.num_inference_steps == 50
    assert job.input.guidance_scale == 7


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        (
            {"num_inference_steps": 0},
            "num_inference_steps",
            "num_inference_steps must be an integer from 1 to 50; got 0",
        ),
        (
            {"num_inference_steps": 51},
            "num_inference_steps",
            "num_inference_steps must be an integer from 1 to 50; got 51",
        ),
        (
            {"num_inference_steps": 2.5},
            "num_inference_steps",
            "num_inference_steps must be an integer from 1 to 50; got 2.5",
        ),
        (
            {"enable_safety_checker": "maybe"},
            "enable_safety_checker",
            "enable_safety_checker must be true or false; got 'maybe'",
        ),
        (
            {"resolution_mode": "7:3"},
            "resolution_mode",
            "resolution_mode must be one of auto (the trained size nearest the input's aspect), "
            "match_input (the input's own size) or a ratio 21:9, 16:9, 4:3, 3:2, 5:4, 1:1, 4:5, "
            "2:3, 3:4, 9:16, 9:21; got '7:3'",
        ),
        (
            {"acceleration": "turbo"},
            "acceleration",
            "acceleration must be one of none, regular, high; got 'turbo'",
        ),
        (
            {"guidance_scale": 21},
            "guidance_scale",
            "guidance_scale must be a number from 1 to 20; got 21",
        ),
        (
            {"image_url": "ftp://example.com/a.png"},
            "image_url",
            "image_url: 'ftp://example.com/a.png' is not an image source",
        ),
        ({"prompt": ""}, "prompt", "prompt must not be empty: say what to edit"),
    ],
)
def test_dev_validation_says_what_is_allowed(
    client: TestClient, fields: dict[str, Any], field: str, message: str
) -> None:
    body, _ = MINIMAL[DEV]

    error = the_error(client, DEV, {**body, **fields})

    assert error["loc"] == ["body", field]
    assert error["msg"].startswith(message)


def test_dev_reports_every_problem_at_once(client: TestClient) -> None:
    body = {"prompt": "x", "resolution_mode": "huge", "acceleration": 3, "num_inference_steps": 99}

    errors = errors_of(client, DEV, body)

    fields = {error["loc"][1] for error in errors}
    assert fields == {"image_url", "resolution_mode", "acceleration", "num_inference_steps"}


def test_unknown_endpoint_lists_the_new_ones(client: TestClient) -> None:
    response = client.post("/fal-ai/flux-kontext/pro", json={"prompt": "x"})

    assert response.status_code == 404
    detail = response.json()["detail"]
    for endpoint in NEW_ENDPOINTS:
        assert endpoint in detail


# --- results ------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", [MAX_T2I, DEV])
def test_result_of_a_new_endpoint_reads_under_its_owner_alias(
    client: TestClient, worker: PlayedWorker, endpoint: str
) -> None:
    body, _ = MINIMAL[endpoint]
    answer = submit(client, body=body, path=endpoint)
    worker.claim()
    worker.succeed()

    response = client.get(answer["response_url"])

    assert response.status_code == 200
    output = response.json()
    assert output["prompt"] == body["prompt"]
    assert output["images"][0]["url"].startswith("http://testserver/files/")


def test_the_openapi_document_still_builds(client: TestClient) -> None:
    response = client.get("/openapi.json")

    assert response.status_code == 200
    assert response.json()["openapi"].startswith("3.")
