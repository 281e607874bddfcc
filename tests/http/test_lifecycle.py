"""``X-Fal-Object-Lifecycle-Preference: {"expiration_duration_seconds": N}``: the finished
request (and its files) is kept N seconds instead of the default; anything malformed is
ignored with a log line, never refused (fal's rule for its hint headers)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_support import PlayedWorker, submit
from starlette.testclient import TestClient

from kontext_server.store.sqlite import SQLiteJobStore

LIFECYCLE = "X-Fal-Object-Lifecycle-Preference"
DEFAULT_RETENTION_S = 3600.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[SQLiteJobStore]:
    """The conftest's store, on a clock the test moves and with a one-hour default."""
    job_store = SQLiteJobStore(
        tmp_path / "jobs.db", clock=clock, default_retention_s=DEFAULT_RETENTION_S
    )
    yield job_store
    job_store.close()


def submit_and_finish(client: TestClient, worker: PlayedWorker, headers: dict[str, str]) -> str:
    answer = submit(client, headers=headers)
    worker.claim()
    worker.succeed()
    return str(answer["request_id"])


def purged_ids(store: SQLiteJobStore) -> set[str]:
    return {job.id for job in store.purge_expired()}


def test_the_lifecycle_preference_sets_how_long_a_finished_request_is_kept(
    client: TestClient, store: SQLiteJobStore, worker: PlayedWorker, clock: FakeClock
) -> None:
    short = submit_and_finish(client, worker, {LIFECYCLE: '{"expiration_duration_seconds": 60}'})
    default = submit_and_finish(client, worker, {})

    clock.now += 59
    assert purged_ids(store) == set()
    clock.now += 2
    assert purged_ids(store) == {short}
    assert client.get(f"/fal-ai/flux-pro/requests/{short}/status").status_code == 404
    assert client.get(f"/fal-ai/flux-pro/requests/{default}/status").status_code == 200


def test_a_longer_preference_outlives_the_default(
    client: TestClient, store: SQLiteJobStore, worker: PlayedWorker, clock: FakeClock
) -> None:
    long = submit_and_finish(
        client, worker, {LIFECYCLE: '{"expiration_duration_seconds": "7200.5"}'}
    )
    default = submit_and_finish(client, worker, {})

    clock.now += DEFAULT_RETENTION_S + 1
    assert purged_ids(store) == {default}
    clock.now += 3600
    assert purged_ids(store) == {long}


@pytest.mark.parametrize(
    "value",
    [
        "not json",
        "[60]",
        '{"expiration_duration_seconds": -5}',
        '{"expiration_duration_seconds": 0}',
        '{"expiration_duration_seconds": "soon"}',
        '{"expiration_duration_seconds": true}',
        '{"expiration_duration_seconds": NaN}',
        '{"expiration_duration_seconds": 1e999}',
        '{"expire_after": 60}',
    ],
)
def test_a_malformed_preference_is_logged_and_the_default_applies(
    client: TestClient,
    store: SQLiteJobStore,
    worker: PlayedWorker,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    value: str,
) -> None:
    with caplog.at_level(logging.WARNING, logger="kontext_server.http.fal.submission"):
        request_id = submit_and_finish(client, worker, {LIFECYCLE: value})

    assert "ignoring X-Fal-Object-Lifecycle-Preference" in caplog.text
    clock.now += DEFAULT_RETENTION_S - 1
    assert purged_ids(store) == set()
    clock.now += 2
    assert purged_ids(store) == {request_id}
