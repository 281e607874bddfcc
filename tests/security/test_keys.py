"""API keys: wrong keys from one client are refused for a while, comparison is constant-time,
keys never reach the logs, and every request-id route hides other keys' requests."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable

import pytest
from http_support import MAX, AppFactory, PlayedWorker, edit_body, submit
from starlette.testclient import TestClient

from kontext_server.core.auth import AuthError, BadKeyThrottle, create_api_key
from kontext_server.store.sqlite import SQLiteJobStore

ATTACKER = ("203.0.113.7", 40000)
BYSTANDER = ("198.51.100.9", 40000)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_client_past_the_failure_limit_is_refused_until_the_lockout_ends() -> None:
    clock = FakeClock()
    throttle = BadKeyThrottle(max_failures=3, window_s=60, lockout_s=30, clock=clock)
    for _ in range(3):
        throttle.record_failure("203.0.113.7")
    throttle.check("203.0.113.7")  # three are allowed

    throttle.record_failure("203.0.113.7")

    with pytest.raises(AuthError) as refused:
        throttle.check("203.0.113.7")
    assert refused.value.status_code == 429 and refused.value.retry_after_s == 30
    throttle.check("198.51.100.9")  # others are not affected
    clock.now += 29.5
    with pytest.raises(AuthError):
        throttle.check("203.0.113.7")
    clock.now += 1
    throttle.check("203.0.113.7")


def test_failures_older_than_the_window_are_forgotten() -> None:
    clock = FakeClock()
    throttle = BadKeyThrottle(max_failures=2, window_s=10, lockout_s=30, clock=clock)
    for _ in range(10):
        throttle.record_failure("a")
        clock.now += 6  # never more than two in ten seconds
        throttle.check("a")


def test_the_throttle_remembers_a_bounded_number_of_clients() -> None:
    throttle = BadKeyThrottle(max_failures=1, max_clients=100)
    for n in range(1000):
        throttle.record_failure(f"client-{n}")
    assert len(throttle._failures) == 100


def test_repeated_bad_keys_get_a_429_with_retry_after_even_with_a_good_key_then(
    make_app: AppFactory, store: SQLiteJobStore
) -> None:
    app = make_app(auth_max_failures=3, auth_lockout_s=120)
    good = create_api_key(store, "alice")[1]
    wrong = {"Authorization": f"Key {good[:-4]}0000"}
    with TestClient(app, client=ATTACKER) as attacker:
        for _ in range(4):
            assert attacker.post(f"/{MAX}", json=edit_body(), headers=wrong).status_code == 401

        locked = attacker.post(
            f"/{MAX}", json=edit_body(), headers={"Authorization": f"Key {good}"}
        )

    assert locked.status_code == 429
    assert locked.headers["retry-after"] == "120"
    assert "Too many invalid API keys from this client (more than 3 in 60 s)" in locked.text
    with TestClient(app, client=BYSTANDER) as bystander:
        submit(bystander, headers={"Authorization": f"Key {good}"})


def test_the_key_id_is_compared_in_constant_time(
    make_app: AppFactory, store: SQLiteJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real: Callable[[bytes, bytes], bool] = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    key = create_api_key(store, "alice")[1]
    with TestClient(make_app(), client=BYSTANDER) as client:
        submit(client, headers={"Authorization": f"Key {key}"})
    assert (key.partition(":")[0].encode(),) * 2 in compared


def test_keys_never_appear_in_the_logs(
    make_app: AppFactory,
    store: SQLiteJobStore,
    worker: PlayedWorker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = create_api_key(store, "alice")[1]
    secret = key.partition(":")[2]
    wrong = key[:-6] + "abcdef"
    with caplog.at_level(logging.DEBUG), TestClient(make_app(), client=BYSTANDER) as client:
        answer = submit(client, headers={"Authorization": f"Key {key}"})
        client.get(answer["status_url"], headers={"Authorization": f"Bearer {wrong}"})
        client.post(f"/{MAX}", json=edit_body(), headers={"Authorization": f"Key {wrong}"})
        worker.claim()
        worker.succeed()
        client.get(answer["response_url"], headers={"Authorization": f"Key {key}"})
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert caplog.records  # something was logged (the access log at least)
    assert secret not in text and secret[:16] not in text
    assert wrong.partition(":")[2] not in text


def _request_id_routes(client: TestClient) -> list[tuple[str, str]]:
    """(method, path template) of every route in the app's schema that takes a request id."""
    paths = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    return [
        (method.upper(), path)
        for path, operations in paths.items()
        if "{request_id}" in path
        for method in operations
    ]


@pytest.mark.timeout(60)
def test_every_request_id_route_answers_404_for_another_keys_request(
    make_app: AppFactory, store: SQLiteJobStore, worker: PlayedWorker
) -> None:
    alice = {"Authorization": f"Key {create_api_key(store, 'alice')[1]}"}
    bob = {"Authorization": f"Key {create_api_key(store, 'bob')[1]}"}
    with TestClient(make_app(), client=BYSTANDER) as client:
        done = submit(client, headers=alice)["request_id"]
        queued = submit(client, headers=alice)["request_id"]
        worker.claim()  # the first one
        worker.succeed()
        routes = _request_id_routes(client)
        assert len(routes) >= 8  # status, stream, result, cancel under "/" and "/queue"
        for request_id in (queued, done):
            for method, template in routes:
                path = template.replace("{endpoint}", MAX)
                path = path.replace("{request_id}", request_id)
                answer = client.request(method, path, headers=bob)
                assert answer.status_code == 404, (method, path, answer.text)
                if request_id == done or not path.endswith("/stream"):  # a queued one never ends
                    assert client.request(method, path, headers=alice).status_code != 404, path
