"""Schemathesis against the app's own OpenAPI schema, in-process (ASGI): no input it can
generate makes the server answer 5xx, and answers that the schema documents match it.

Bounded for CI: a few examples per operation (``FUZZ_EXAMPLES``), no deadline. Authentication
is off for everyone (``insecure_no_auth``) so that the fuzzer reaches the handlers; streams of
unknown requests answer 404 at once, so nothing here waits on a worker.
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi import FastAPI
from http_support import AppFactory
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

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
