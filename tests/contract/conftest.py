"""The job-store conformance suite: every test runs against every backend.

To add a backend, add one entry to ``BACKENDS``: a function that, given the pytest request
(to reach session fixtures such as ``pg_cluster``), returns a ``Backend``: a function that
gives a fresh, empty store's URL (it may use the temporary folder it is given), and one that
opens a store at a URL with a given clock. Nothing else changes; the tests only see the
``JobStore`` protocol.

PostgreSQL: one database per session (``kontext_contract`` in the session's throwaway
cluster); a fresh URL empties its tables (``DELETE``, ~5 ms with the connection) rather
than creating a database per test (~110 ms with migrations; ``TRUNCATE`` takes ~40 ms): the
state-machine test wants a fresh store for each of its 100 examples. The postgres
parameters are skipped only when no ``initdb`` exists.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from contract.pg_cluster import PgCluster
from kontext_server.domain.editing import EditInput
from kontext_server.domain.jobs import NewJob
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


def _sqlite_backend(request: pytest.FixtureRequest) -> Backend:
    return Backend(
        name="sqlite",
        fresh_url=lambda folder: f"sqlite:///{folder / 'jobs.db'}",
        open=_open_sqlite,
    )


def _open_postgres(url: str, clock: Callable[[], float]) -> JobStore:
    from kontext_server.store.postgres import PostgresJobStore

    return PostgresJobStore(url, clock=clock, pool_max=12)


def _postgres_backend(request: pytest.FixtureRequest) -> Backend:
    url: str = request.getfixturevalue("pg_contract_database")

    def fresh_url(folder: Path) -> str:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            # DELETE, not TRUNCATE: on a few rows it takes 1 ms instead of 40 ms.
            conn.execute(
                "DELETE FROM webhook_outbox; DELETE FROM job_events; DELETE FROM api_keys;"
                " DELETE FROM jobs"
            )
        return url

    return Backend(name="postgres", fresh_url=fresh_url, open=_open_postgres)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "sqlite": _sqlite_backend,
    "postgres": _postgres_backend,
}


@pytest.fixture(scope="session")
def pg_contract_database(pg_cluster: PgCluster) -> str:
    """The session's conformance database, migrated (so that fresh URLs only truncate)."""
    from kontext_server.store.postgres import PostgresJobStore

    url = pg_cluster.create_database("kontext_contract")
    PostgresJobStore(url).close()
    return url


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param](request)


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
        "input": EditInput(prompt="make it blue", references=("https://example.com/cat.png",)),
    }
    return NewJob(**(defaults | fields))


@pytest.fixture
def make_job() -> Callable[..., NewJob]:
    return new_job
