"""The job-store conformance suite: every test runs against every backend.

To add a backend (PostgreSQL later), add one entry to ``BACKENDS``: a function that gives a
fresh, empty store's URL inside a temporary folder, and one that opens a store at a URL
with a given clock. Nothing else changes; the tests only see the ``JobStore`` protocol.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kontext_server.jobs import NewJob
from kontext_server.store.base import JobStore
from kontext_server.store.sqlite import SQLiteJobStore

START_TIME = 1_700_000_000.0


class FakeClock:
    """Unix seconds that only move when a test says so."""

    def __init__(self, now: float = START_TIME) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Backend:
    name: str
    fresh_url: Callable[[Path], str]  # an empty store living inside the given folder
    open: Callable[[str, Callable[[], float]], JobStore]  # (url, clock) -> store


def _open_sqlite(url: str, clock: Callable[[], float]) -> JobStore:
    return SQLiteJobStore(url.removeprefix("sqlite:///"), clock=clock)


BACKENDS: dict[str, Backend] = {
    "sqlite": Backend(
        name="sqlite",
        fresh_url=lambda folder: f"sqlite:///{folder / 'jobs.db'}",
        open=_open_sqlite,
    ),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake_clock_type() -> type[FakeClock]:
    """For tests that build their own stores (e.g. one per Hypothesis example)."""
    return FakeClock


@pytest.fixture
def store_url(backend: Backend, tmp_path: Path) -> str:
    return backend.fresh_url(tmp_path)


@pytest.fixture
def open_store(
    backend: Backend, store_url: str, clock: FakeClock
) -> Iterator[Callable[[], JobStore]]:
    """Opens (another handle on) the test's store, as a restarted process would."""
    opened: list[JobStore] = []

    def open_again() -> JobStore:
        opened.append(backend.open(store_url, clock))
        return opened[-1]

    yield open_again
    for handle in opened:
        handle.close()


@pytest.fixture
def store(open_store: Callable[[], JobStore]) -> JobStore:
    return open_store()


def new_job(**fields: Any) -> NewJob:
    """A valid ``NewJob`` with a fresh id; ``fields`` override the defaults."""
    defaults: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "endpoint": "fal-ai/flux-pro/kontext/max",
        "input": {"prompt": "make it blue", "image_url": "https://example.com/cat.png"},
    }
    return NewJob(**(defaults | fields))


@pytest.fixture
def make_job() -> Callable[..., NewJob]:
    return new_job
