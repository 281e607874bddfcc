"""PostgreSQL-only behaviour: outages, concurrent starts, migrations, error messages.

(The protocol itself is checked on PostgreSQL by the conformance suite next to this file.)
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from contract.pg_cluster import PgCluster
from kontext_server.domain.editing import EditInput
from kontext_server.domain.errors import StoreError
from kontext_server.domain.jobs import JobStatus, NewJob
from kontext_server.store import open_store
from kontext_server.store import postgres as postgres_module
from kontext_server.store.postgres import PostgresJobStore
from kontext_server.store.postgres_schema import SCHEMA_VERSION


def new_job() -> NewJob:
    return NewJob(
        id=str(uuid.uuid4()), endpoint="fal-ai/flux-pro/kontext", input=EditInput(prompt="x")
    )


@pytest.fixture
def database_url(pg_cluster: PgCluster) -> str:
    return pg_cluster.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(database_url: str) -> Iterator[PostgresJobStore]:
    opened = PostgresJobStore(database_url, acquire_timeout_s=2.0)
    yield opened
    opened.close()


def wait_until_back(store: PostgresJobStore, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            store.queue_depth()
            return
        except StoreError:
            if time.monotonic() > deadline:
                raise


def test_store_recovers_by_itself_after_postgresql_restarts(
    pg_cluster: PgCluster, store: PostgresJobStore
) -> None:
    before, _ = store.submit(new_job())
    pg_cluster.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="unavailable"):
            store.get(before.id)
        with pytest.raises(StoreError, match="unavailable"):
            store.claim("worker-1", 30)
        with pytest.raises(StoreError, match="unavailable"):
            store.ping()  # readiness: a real round trip, never an answer from memory
        assert time.monotonic() - started < 10  # bounded by acquire_timeout_s, not hanging
        store.wait_for_work(0.2)  # a hint: waits out its timeout, never raises
    finally:
        pg_cluster.start()
    # The pool's connections all died with the server; the next calls must not see that.
    assert store.get(before.id) == before
    claimed = store.claim("worker-1", 30)
    assert claimed is not None
    assert claimed.id == before.id
    assert store.finish(claimed.id, "worker-1", claimed.attempts, JobStatus.SUCCEEDED, result={})


def test_wait_for_work_listens_again_after_a_restart(
    pg_cluster: PgCluster, store: PostgresJobStore, database_url: str
) -> None:
    store.wait_for_work(0.01)  # opens the listening connection
    pg_cluster.stop()
    pg_cluster.start()
    wait_until_back(store, 10)
    store.wait_for_work(0.01)  # notices the dead listener and opens a new one
    other = PostgresJobStore(database_url)
    timer = threading.Timer(0.3, lambda: other.submit(new_job()))
    try:
        started = time.monotonic()
        timer.start()
        store.wait_for_work(10)
        assert time.monotonic() - started < 3
    finally:
        timer.join()
        other.close()


def test_processes_starting_together_apply_each_migration_once(database_url: str) -> None:
    program = (
        "import sys; from kontext_server.store import open_store;"
        " open_store(sys.argv[1]).close(); print('ok')"
    )
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", program, database_url], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outputs = [starter.communicate(timeout=60)[0].strip() for starter in starters]
    assert outputs == ["ok"] * 4
    assert [s.returncode for s in starters] == [0] * 4
    with psycopg.connect(database_url) as conn:
        versions = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [v for (v,) in versions] == list(range(1, SCHEMA_VERSION + 1))


def test_newer_schema_is_refused_with_advice(database_url: str) -> None:
    PostgresJobStore(database_url).close()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_version VALUES (%s, 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="upgrade kontext-server"):
        PostgresJobStore(database_url)


def test_unreachable_server_is_a_store_error_without_the_password(
    pg_cluster: PgCluster,
) -> None:
    url = f"postgresql://postgres:s3cret@/nope?host={pg_cluster.folder}/no-socket-here"
    with pytest.raises(StoreError) as raised:
        PostgresJobStore(url, acquire_timeout_s=0.5)
    assert "s3cret" not in str(raised.value)
    assert "nope" in str(raised.value)


def test_open_store_accepts_both_postgres_schemes(database_url: str) -> None:
    for url in (database_url, database_url.replace("postgresql://", "postgres://", 1)):
        store = open_store(url)
        try:
            assert isinstance(store, PostgresJobStore)
            assert store.queue_depth() == 0
        finally:
            store.close()


def test_json_payloads_round_trip(store: PostgresJobStore) -> None:
    """jsonb keeps values (not key order): unicode, nesting, floats, big ints, nulls."""
    payload = EditInput(
        prompt='ünïcode ✓ "quoted"',
        references=("https://example.com/ü.png", "data:image/png;base64,AAAA"),
        seed=2**53 + 1,
        guidance_scale=2.5,
    )
    job, _ = store.submit(
        NewJob(id=str(uuid.uuid4()), endpoint="fal-ai/flux-pro/kontext", input=payload)
    )
    got = store.get(job.id)
    assert got is not None
    assert got.input == payload


def test_queue_positions_load_a_long_line_in_chunks(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The positions' picture comes in rows of at most ``_SEQ_CHUNK`` seqs (here 4): a line
    cut into chunks, with gaps left by claims, answers what a count of the table answers."""
    monkeypatch.setattr(postgres_module, "_SEQ_CHUNK", 4)
    writer = PostgresJobStore(database_url)
    reader = PostgresJobStore(database_url)  # another process: knows only what it loads
    try:
        jobs = [answer.job for answer in writer.submit_many([new_job() for _ in range(23)])]
        for _ in range(3):
            assert writer.claim("worker-1", 30.0) is not None
        writer.request_cancel(jobs[9].id)  # a queued job: canceled at once
        queued = [job for job in jobs[3:] if job.id != jobs[9].id]
        lines = reader._queued_lines()
        assert len(lines) > 3
        assert all(len(seqs) <= 4 for _, _, seqs in lines)
        assert [seq for _, _, seqs in lines for seq in seqs] == [job.seq for job in queued]
        for ahead, job in enumerate(queued):
            assert reader.queue_position(job.id) == ahead
    finally:
        writer.close()
        reader.close()
