"""The app's route order: exact submit paths for the served endpoints first, the catch-all
``POST /{endpoint:path}`` last, and every other POST route (BFL, OpenAI, /run, storage)
still answered by its own handler. Also: submits made at the same moment through the real
app (group commit) get distinct request ids and consistent queue positions."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from http_support import IMAGE_URL, MAX, LiveServer, edit_body
from starlette.routing import BaseRoute, Match
from starlette.testclient import TestClient

from kontext_server.http.fal.schemas import ENDPOINTS, MaxMultiInput, TextToImageInput
from kontext_server.metrics import SUBMIT_BATCH_SIZE
from kontext_server.store.sqlite import SQLiteJobStore

T = TypeVar("T")
CATCH_ALL = "/{endpoint:path}"
QUEUE_CATCH_ALL = "/queue/{endpoint:path}"


def run(coroutine: Coroutine[Any, Any, T], timeout_s: float = 30) -> T:
    """``asyncio.run`` with a time limit (a submit that never answers fails the test)."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


def body_for(endpoint: str) -> dict[str, Any]:
    """A minimal valid body of a served endpoint."""
    model = ENDPOINTS[endpoint]
    if model is TextToImageInput:
        return {"prompt": "A donut on a table."}
    if model is MaxMultiInput:
        return {"prompt": "Put them together.", "image_urls": [IMAGE_URL]}
    return {"prompt": "Put a donut next to the flour.", "image_url": IMAGE_URL}


def first_route_index(app: FastAPI, method: str, path: str) -> int:
    """The index in ``app.router.routes`` of the route Starlette's router picks for
    ``method path``: the first full match (an included router counts as one route)."""
    scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    for index, route in enumerate(app.router.routes):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return index
    raise AssertionError(f"no route takes {method} {path}")


def route_path(app: FastAPI, method: str, path: str) -> str | None:
    """The path template of the route that takes ``method path`` (None: an included
    router's route)."""
    route: BaseRoute = app.router.routes[first_route_index(app, method, path)]
    return route.path if isinstance(route, APIRoute) else None


def catch_all_indexes(app: FastAPI) -> list[int]:
    return [
        index
        for index, route in enumerate(app.router.routes)
        if isinstance(route, APIRoute) and route.path in (CATCH_ALL, QUEUE_CATCH_ALL)
    ]


def histogram_count_and_sum() -> tuple[float, float]:
    (metric,) = SUBMIT_BATCH_SIZE.collect()
    values = {sample.name: sample.value for sample in metric.samples if not sample.labels}
    return values[f"{metric.name}_count"], values[f"{metric.name}_sum"]


# --- which route takes which path -----------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/queue"])
def test_each_served_endpoint_has_an_exact_submit_route(app: FastAPI, prefix: str) -> None:
    for endpoint in ENDPOINTS:
        assert route_path(app, "POST", f"{prefix}/{endpoint}") == f"{prefix}/{endpoint}"


def test_the_catch_all_submit_routes_are_the_last_routes(app: FastAPI) -> None:
    routes = app.router.routes
    assert catch_all_indexes(app) == [len(routes) - 2, len(routes) - 1]
    assert [route_path(app, "POST", path) for path in ("/queue/x", "/x")] == [
        QUEUE_CATCH_ALL,
        CATCH_ALL,
    ]
    assert route_path(app, "POST", "/fal-ai/unknown/model") == CATCH_ALL
    assert route_path(app, "POST", "/queue/fal-ai/unknown/model") == QUEUE_CATCH_ALL
    assert route_path(app, "POST", f"/{MAX}/") == CATCH_ALL


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/flux-kontext-max"),
        ("POST", "/v1/flux-kontext-pro"),
        ("POST", "/v1/images/edits"),
        ("POST", f"/run/{MAX}"),
        ("POST", "/cdn/files/upload"),
        ("POST", "/rest/storage/upload/initiate"),
        ("POST", "/rest/storage/auth/token"),
        ("POST", "/proxy"),
        ("GET", "/healthz"),
        ("GET", f"/queue/{MAX}/requests/abc/status"),
        ("GET", f"/{MAX}/requests/abc/status"),
    ],
)
def test_other_paths_are_taken_by_a_route_before_the_catch_all(
    app: FastAPI, method: str, path: str
) -> None:
    assert first_route_index(app, method, path) < min(catch_all_indexes(app))


# --- submits of served endpoints, over HTTP -------------------------------------------------------


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_a_served_endpoint_is_submittable_with_and_without_queue_and_trailing_slash(
    client: TestClient, store: SQLiteJobStore, endpoint: str
) -> None:
    for prefix in ("", "/queue"):
        for slash in ("", "/"):
            response = client.post(f"{prefix}/{endpoint}{slash}", json=body_for(endpoint))

            assert response.status_code == 200, (prefix, slash, response.text)
            answer = response.json()
            job = store.get(answer["request_id"])
            assert job is not None and job.endpoint == endpoint
            assert answer["status_url"].startswith(f"http://testserver{prefix}/fal-ai/")
            assert client.get(answer["status_url"]).status_code == 202
    assert store.queue_depth() == 4


@pytest.mark.parametrize(
    ("path", "named"),
    [
        ("/fal-ai/unknown/model", "fal-ai/unknown/model"),
        ("/queue/fal-ai/unknown/model", "fal-ai/unknown/model"),
        ("/fal-ai/flux-pro/kontext/maximum", "fal-ai/flux-pro/kontext/maximum"),
    ],
)
def test_an_unknown_endpoint_is_a_404_that_lists_the_served_ones(
    client: TestClient, store: SQLiteJobStore, path: str, named: str
) -> None:
    response = client.post(path, json=edit_body())

    assert response.status_code == 404
    detail = response.json()["detail"]
    assert repr(named) in detail
    assert all(endpoint in detail for endpoint in ENDPOINTS)
    assert store.queue_depth() == 0


# --- other POST routes reach their own handlers ---------------------------------------------------


def test_a_bfl_submit_is_answered_by_the_bfl_api(client: TestClient, store: SQLiteJobStore) -> None:
    for tier in ("max", "pro"):
        response = client.post(
            f"/v1/flux-kontext-{tier}", json={"prompt": "make it blue", "input_image": IMAGE_URL}
        )

        assert response.status_code == 200, response.text
        answer = response.json()
        assert set(answer) == {"id", "polling_url"}
        assert store.get(answer["id"]) is not None
        polled = client.get(answer["polling_url"])
        assert polled.status_code == 200 and polled.json()["id"] == answer["id"]


def test_an_openai_edit_is_answered_by_the_openai_api(client: TestClient) -> None:
    response = client.post("/v1/images/edits", json={"prompt": "x"})

    # the catch-all would answer 404 "Unknown endpoint 'v1/images/edits'"
    assert response.status_code == 400
    assert "multipart/form-data" in response.json()["error"]["message"]


def test_a_run_is_answered_by_the_run_route(client: TestClient, store: SQLiteJobStore) -> None:
    response = client.post(f"/run/{MAX}", json={"prompt": "no image"})

    # /run validates for MAX; the catch-all would look for an endpoint "run/..." and 404
    assert response.status_code == 422, response.text
    assert store.queue_depth() == 0


def test_storage_uploads_are_answered_by_the_storage_routes(client: TestClient) -> None:
    uploaded = client.post(
        "/cdn/files/upload", content=b"not really a png", headers={"Content-Type": "image/png"}
    )
    initiated = client.post(
        "/rest/storage/upload/initiate", json={"content_type": "image/png", "file_name": "a.png"}
    )
    token = client.post("/rest/storage/auth/token?storage_type=fal-cdn-v3", json={})

    assert uploaded.status_code == 200, uploaded.text
    assert client.get(uploaded.json()["access_url"]).content == b"not really a png"
    assert initiated.status_code == 200, initiated.text
    assert set(initiated.json()) == {"upload_url", "file_url"}
    assert token.status_code == 200, token.text
    assert token.json()["token_type"] == "Bearer"


def test_operations_routes_still_answer(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_the_openapi_document_lists_the_exact_submit_paths_but_not_the_catch_all(
    client: TestClient,
) -> None:
    response = client.get("/openapi.json")

    assert response.status_code == 200
    paths = response.json()["paths"]
    for endpoint in ENDPOINTS:
        assert "post" in paths[f"/{endpoint}"]
        assert "post" in paths[f"/queue/{endpoint}"]
    assert CATCH_ALL not in paths
    assert QUEUE_CATCH_ALL not in paths
    submit_ids = [item["post"]["operationId"] for item in paths.values() if "post" in item]
    assert len(submit_ids) == len(set(submit_ids))


# --- submits at the same moment ----------------------------------------------------------------


async def submit_at_once(
    count: int, *, base_url: str, transport: httpx.AsyncBaseTransport | None = None
) -> list[dict[str, Any]]:
    """``count`` submits of /max started together (half under /queue); their answers."""
    async with httpx.AsyncClient(transport=transport, base_url=base_url, timeout=30) as http:
        paths = [f"/{MAX}" if n % 2 else f"/queue/{MAX}" for n in range(count)]
        responses = await asyncio.gather(*(http.post(path, json=edit_body()) for path in paths))
    assert [response.status_code for response in responses] == [200] * count
    return [response.json() for response in responses]


def assert_distinct_and_in_line(answers: list[dict[str, Any]], store: SQLiteJobStore) -> None:
    """Distinct request ids; in insert order, each one had every earlier one ahead of it
    (all are normal priority), which is also what the store says now."""
    request_ids = [answer["request_id"] for answer in answers]
    assert len(set(request_ids)) == len(answers)
    seqs = {job.id: job.seq for job in map(store.get, request_ids) if job is not None}
    by_seq = sorted(answers, key=lambda answer: seqs[answer["request_id"]])
    assert [answer["queue_position"] for answer in by_seq] == list(range(len(answers)))
    now = [store.queue_position(request_id) for request_id in request_ids]
    assert now == [answer["queue_position"] for answer in answers]


def test_concurrent_submits_in_process_share_transactions_and_stay_in_line(
    app: FastAPI, store: SQLiteJobStore
) -> None:
    count = 24
    count_before, sum_before = histogram_count_and_sum()
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))

    answers = run(submit_at_once(count, base_url="http://testserver", transport=transport))

    assert_distinct_and_in_line(answers, store)
    count_after, sum_after = histogram_count_and_sum()
    assert sum_after - sum_before == count  # every job committed once, through group commit
    assert count_after - count_before < count  # in fewer transactions than jobs


def test_concurrent_submits_over_loopback_http_stay_in_line(
    live_server: LiveServer, store: SQLiteJobStore
) -> None:
    answers = run(submit_at_once(24, base_url=live_server.url))

    assert_distinct_and_in_line(answers, store)
    assert store.queue_depth() == 24


def test_concurrent_submits_with_one_idempotency_key_make_one_request(
    app: FastAPI, store: SQLiteJobStore
) -> None:
    # the same turn, so the same batch: the repeats find the first job inside the transaction
    async def submit_with_the_key() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            bodies = [edit_body(), edit_body(), edit_body(prompt="something else")]
            return await asyncio.gather(
                *(
                    http.post(f"/{MAX}", json=body, headers={"Idempotency-Key": "k-1"})
                    for body in bodies
                )
            )

    same, again, different = run(submit_with_the_key())

    assert [same.status_code, again.status_code, different.status_code] == [200, 200, 409]
    assert same.json()["request_id"] == again.json()["request_id"]
    assert same.json()["request_id"] in different.json()["detail"]
    assert store.queue_depth() == 1
