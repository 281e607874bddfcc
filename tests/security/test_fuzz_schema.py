"""Schemathesis against the app's own OpenAPI schema, in-process (ASGI): no input it can
generate makes the server answer 5xx, and answers that the schema documents match it. A
stateful run (with an API key) submits and follows the created requests' links.

Bounded for CI: a few examples per operation (``FUZZ_EXAMPLES``), no deadline. Authentication
is off for everyone (``insecure_no_auth``) so that the fuzzer reaches the handlers; streams of
unknown requests answer 404 at once, so nothing here waits on a worker.
"""

from __future__ import annotations

import copy
from typing import Any
from urllib.parse import unquote

import pytest
import schemathesis
from fastapi import FastAPI
from http_support import AppFactory
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from kontext_server.core.auth import create_api_key
from kontext_server.http.fal.wire import endpoint_matches

FUZZ_EXAMPLES = 20


@pytest.fixture
def fuzzed_app(make_app: AppFactory) -> FastAPI:
    return make_app(insecure_no_auth=True, fetch_allow_hosts=[])


def _operations(app: FastAPI) -> list[APIOperation]:
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in loaded.get_all_operations()]


# schemathesis' own pytest plugin does not run under pytest 9 yet: drive Hypothesis directly.
@pytest.mark.timeout(300)
def test_no_input_makes_the_api_fail_or_break_its_schema(fuzzed_app: FastAPI) -> None:
    operations = _operations(fuzzed_app)
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(
                checks=[not_a_server_error, response_schema_conformance, content_type_conformance]
            )

        fuzz()


# --- stateful: submit, then follow the answer's request id, with an API key ------------------

STATEFUL_STEPS = 8
STATEFUL_SCENARIOS = 25
# submit operations (by path) -> the owner/alias their request-id routes live under
_SUBMITS = {
    "/fal-ai/flux-pro/kontext/max": "fal-ai/flux-pro",
    "/fal-ai/flux-pro/kontext/max/multi": "fal-ai/flux-pro",
    "/fal-ai/flux-pro/kontext/max/text-to-image": "fal-ai/flux-pro",
    "/fal-ai/flux-kontext/dev": "fal-ai/flux-kontext",
}
_FOLLOWED = {  # link name -> (path of the request-id route, method)
    "status": ("/{endpoint}/requests/{request_id}/status", "get"),
    "result": ("/{endpoint}/requests/{request_id}", "get"),
    "cancel": ("/{endpoint}/requests/{request_id}/cancel", "put"),
}


def _linked_schema(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document with links from each submit to the status, result and
    cancel of the request it created (``$response.body#/request_id``). The status streams
    are left out: with no worker here, a stream of a queued request never ends."""
    raw = copy.deepcopy(app.openapi())
    paths = raw["paths"]
    for path in [p for p in paths if p.endswith("/status/stream")]:
        del paths[path]
    for submit_path, owner_alias in _SUBMITS.items():
        operation = paths[submit_path]["post"]
        links = {
            name: {
                "operationId": paths[path][method]["operationId"],
                "parameters": {
                    "path.endpoint": owner_alias,
                    "path.request_id": "$response.body#/request_id",
                },
            }
            for name, (path, method) in _FOLLOWED.items()
        }
        operation["responses"]["200"]["links"] = links
    return raw


@pytest.mark.timeout(300)
def test_stateful_runs_with_an_api_key_never_fail(make_app: AppFactory, store: Any) -> None:
    """schemathesis' state machine submits with a real API key and follows each created
    request to its status, result and cancel: no answer is a 5xx, each is JSON, and a
    request this key created is never answered 404 to it."""
    app = make_app(fetch_allow_hosts=[])
    _, key = create_api_key(store, "fuzzer")
    schema = schemathesis.openapi.from_dict(_linked_schema(app))
    schema.app = app
    created: dict[str, str] = {}  # request id -> the endpoint it was submitted to
    followed: list[int] = []
    failures: list[str] = []  # the first failure, shown even if Hypothesis cannot replay it

    class WithKey(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"headers": {"Authorization": f"Key {key}"}}

        def validate_response(
            self, response: Any, case: schemathesis.Case, *args: Any, **kwargs: Any
        ) -> None:
            try:
                check(response, case)
            except Exception as exc:
                failures.append(f"{case.method} {case.formatted_path}: {exc}")
                raise

    def check(response: Any, case: schemathesis.Case) -> None:
        case.validate_response(response, checks=[not_a_server_error])
        [content_type] = response.headers.get("content-type") or [""]
        assert content_type.startswith("application/json"), (case.path, content_type)
        parameters = case.path_parameters or {}
        if case.method.upper() == "POST" and response.status_code == 200:
            submitted = case.formatted_path.strip("/").removeprefix("queue/")
            created[response.json()["request_id"]] = submitted
        elif parameters.get("request_id") in created and endpoint_matches(
            # Links set the owner/alias of the request; generated ones may name another.
            unquote(str(parameters["endpoint"])),
            created[parameters["request_id"]],
        ):
            followed.append(response.status_code)
            assert response.status_code != 404, (case.formatted_path, response.text)

    try:
        WithKey.run(
            settings=settings(
                max_examples=STATEFUL_SCENARIOS,
                stateful_step_count=STATEFUL_STEPS,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
            )
        )
    finally:
        if failures:  # the store keeps its state between scenarios: replays may differ
            print("first failure:", failures[0])
    print(f"stateful: {len(created)} requests created, {len(followed)} link calls")
    assert created, "no submit succeeded: the state machine never reached the request routes"
    assert followed, "no link was followed"
