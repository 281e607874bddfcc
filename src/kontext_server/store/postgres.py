"""``PostgresJobStore``: the scale-out job store (many API and worker processes, many hosts).

The same tables, state machine and fencing as ``SQLiteJobStore``; PostgreSQL specifics:

* A ``psycopg_pool.ConnectionPool`` of autocommit connections, checked before each use. A
  call that cannot reach PostgreSQL raises ``StoreUnavailableError`` (no psycopg exception
  leaves this module) and marks the pool suspect; while it is, calls probe the server with
  one plain connection (one probe at a time, ``PROBE_TIMEOUT_S`` at most, and after a failed
  one none for as long as it took; the other calls fail at once) and, once the server
  answers, replace the pool. So an outage is answered promptly, and the first call after
  PostgreSQL is back works, instead of waiting out the pool's reconnection backoff (1 s,
  2 s, 4 s, ...).
* Most operations are one statement (data-modifying CTEs): a move to a final status sets
  ``expires_at``, appends the closing event and the outbox row in the statement that moves
  it, so each is atomic without an explicit transaction and costs one round trip.
* Claims, the outbox, lease expiry and purges pick rows with ``FOR UPDATE SKIP LOCKED``:
  concurrent workers and API processes never wait on, nor take, each other's rows.
* Every write that adds a job event first locks the job's row, so a job's events commit in
  the order of their ids (SSE resumes after an id and must not skip a late commit).
* ``submit``, ``release`` and requeues ``NOTIFY kontext_jobs``; ``wait_for_work`` LISTENs on
  a dedicated connection. Notifications are hints; the tables stay the truth.
* Migrations are applied on start under an advisory lock.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.adapt import AdaptersMap
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg.types.string import TextLoader
from psycopg_pool import ConnectionPool, PoolTimeout

from kontext_server.domain.errors import StoreError, StoreUnavailableError
from kontext_server.domain.jobs import (
    CancelOutcome,
    Job,
    JobStatus,
    NewJob,
    Progress,
    PurgedJob,
    QueueDepth,
    Submitted,
    WebhookDelivery,
)
from kontext_server.store.common import (
    CANCELLED_ERROR,
    CANCELLED_ERROR_TYPE,
    DEFAULT_RETENTION_S,
    RELEASED_EVENT,
    START_TIMEOUT_ERROR,
    START_TIMEOUT_ERROR_TYPE,
    WORKER_LOST_ERROR,
    WORKER_LOST_ERROR_TYPE,
    final_event,
    finish_error,
)
from kontext_server.store.postgres_schema import (
    MIGRATION_LOCK_ID,
    MIGRATIONS,
    NOTIFY_CHANNEL,
    SCHEMA_VERSION,
)
from kontext_server.store.rows import (
    deliveries_from_rows,
    dumps,
    job_from_row,
    job_insert_values,
    new_job,
    purged_from_row,
    queue_depth_from_row,
)
from kontext_server.store.sql_store import SqlJobStore
from kontext_server.store.statements import PYFORMAT

__all__ = ["PostgresJobStore"]

Connection = psycopg.Connection[DictRow]

CONNECT_TIMEOUT_S = 5
PROBE_TIMEOUT_S = 2  # connecting to see whether the server is back (libpq's smallest timeout)
_ACQUIRE_SLICE_S = 0.1  # waiting for a pooled connection: how often to look for an outage
CHECK_IDLE_S = 1.0  # a pooled connection idle longer is checked (a round trip) before use
_SEQ_CHUNK = 32_768  # seqs per row of the queue positions' load (at most 256 kB: one GIL hold)
PREPARE_THRESHOLD = 1  # psycopg prepares a statement on its second run on a connection
_SUBMIT_TRIES = 3  # an idempotency conflict whose job is purged before we read it: insert again
# Submits, one or a batch, in one statement in autocommit (one round trip, one commit): each
# column of ``job_insert_values`` is one array parameter, whatever the batch's size (a
# pipelined INSERT per job in a transaction cost the API process ~0.15 ms of Python per job,
# and BEGIN and COMMIT a round trip each); the arrays go in binary (``%b``: psycopg quotes
# each element of a text array with a regular expression, ~3 x the Python time). Rows go in
# in the batch's order, so their seqs do too; a row whose idempotency key is taken (by an
# earlier job or one before it in the batch) is skipped and has no seq in the answer. The
# notification is sent when (and only if) the insert commits. Only the ids and seqs come back
# (the rest is known: no row to send and decode). No queue position here: ``QueueRanks``
# answers it from memory.
_INSERT_JOBS_SQL = (
    "WITH batch AS (SELECT * FROM unnest("
    "%b::text[], %b::text[], %b::text[], %b::int[], %b::int[], %b::text[], %b::float8[],"
    " %b::text[], %b::text[], %b::text[], %b::float8[], %b::float8[], %b::text[])"
    " WITH ORDINALITY AS b(id, owner, endpoint, priority, max_attempts, input,"
    " start_deadline_at, webhook_url, base_url, idempotency_key, retention_s, created_at,"
    " engine, n)),"
    " inserted AS (INSERT INTO jobs (id, owner, endpoint, priority, status, max_attempts,"
    " input, start_deadline_at, webhook_url, base_url, idempotency_key, retention_s,"
    " created_at, engine)"
    " SELECT id, owner, endpoint, priority, 'queued', max_attempts, input::jsonb,"
    " start_deadline_at, webhook_url, base_url, idempotency_key, retention_s, created_at,"
    " engine FROM batch ORDER BY n"
    " ON CONFLICT (coalesce(owner, ''), idempotency_key)"
    " WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id, seq)"
    f" SELECT i.id, i.seq, pg_notify('{NOTIFY_CHANNEL}', '') FROM inserted AS i"
)
# statements.FENCE with named parameters, for the statements that also name others.
_FENCE = (
    "id = %(job_id)s AND status = 'running' AND lease_owner = %(worker_id)s"
    " AND attempts = %(attempt)s"
)
# The columns that make a job final; %(now)s and %(retention_s)s (the store default).
_FINAL_COLUMNS = (
    "finished_at = %(now)s, lease_until = NULL,"
    " expires_at = %(now)s + coalesce(retention_s, %(retention_s)s)"
)


def _closing(update: str) -> str:
    """``update`` (an ``UPDATE jobs ...`` to a final status, without ``RETURNING``) plus what
    every move to a final status does, in the same statement: the closing event
    (``%(level)s``, ``%(message)s``) and, with a webhook URL, one outbox row. Returns the
    ids (and engine, priority, seq) of the jobs it closed."""
    return (
        f"WITH done AS ({update} RETURNING id, webhook_url, engine, priority, seq),"
        " closing_events AS (INSERT INTO job_events (job_id, at, level, message)"
        "   SELECT id, %(now)s, %(level)s, %(message)s FROM done),"
        " hooks AS (INSERT INTO webhook_outbox (job_id, url, next_attempt_at, created_at)"
        "   SELECT id, webhook_url, %(now)s, %(now)s FROM done WHERE webhook_url IS NOT NULL)"
        " SELECT id, engine, priority, seq FROM done"
    )


# jsonb columns arrive as their text, decoded by ``rows.py`` as SQLite's are: one decoding
# of a stored job's JSON for both backends (``psycopg.adapters`` loads them with json.loads).
_ADAPTERS = AdaptersMap(psycopg.adapters)
_ADAPTERS.register_loader("jsonb", TextLoader)


def _int8_array(big_endian: bytes) -> array[int]:
    """8-byte big-endian signed integers (PostgreSQL's ``int8send``) as an ``array``."""
    seqs = array("q")
    seqs.frombytes(big_endian)
    if sys.byteorder == "little":
        seqs.byteswap()
    return seqs


def describe_dsn(dsn: str) -> str:
    """``dbname on host:port`` for messages: never the password."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise StoreError(f"not a valid PostgreSQL URL or conninfo string: {exc}") from exc
    host = parts.get("host") or "localhost"
    return f"database {parts.get('dbname') or '(default)'} on {host}:{parts.get('port') or 5432}"


class PostgresJobStore(SqlJobStore):
    """The ``JobStore`` protocol on PostgreSQL (tested with 15). Thread-safe; open one per
    process (a pool must not cross ``fork()``).

    ``dsn`` is a libpq URL or conninfo string (``postgresql://user:pass@host:5432/db``).
    ``clock`` returns unix seconds (all times are the caller's clock, never the server's:
    tests inject a fake one). ``pool_max`` bounds the connections this process opens
    (plus one for ``wait_for_work``). ``default_retention_s`` is how long a finished job is
    kept when its ``NewJob.retention_s`` is ``None``. ``acquire_timeout_s`` is how long a
    call waits for a free connection of the pool before ``StoreUnavailableError``.
    """

    waits_on_network = True  # every call is a round trip: the API calls off its event loop
    _sql = PYFORMAT
    _list_api_keys_sql = 'SELECT * FROM api_keys ORDER BY created_at, id COLLATE "C"'

    def __init__(
        self,
        dsn: str,
        *,
        clock: Callable[[], float] = time.time,
        pool_max: int = 10,
        default_retention_s: float = DEFAULT_RETENTION_S,
        acquire_timeout_s: float = 5.0,
    ) -> None:
        if pool_max < 1:
            raise StoreError(f"pool_max must be at least 1, not {pool_max}")
        self._dsn = dsn
        self._where = describe_dsn(dsn)
        super().__init__(clock=clock, default_retention_s=default_retention_s)
        self._pool_max = pool_max
        self._acquire_timeout_s = acquire_timeout_s
        self._listen_lock = threading.Lock()
        self._listener: Connection | None = None
        self._closed = False
        self._pool_lock = threading.Lock()
        self._pool_suspect = False
        self._probing = False  # a probe is under way (see _healthy_pool)
        self._next_probe_at = 0.0  # time.monotonic(); no probe before this
        self._last_failure: BaseException = StoreError("not connected yet")
        self._used_at: weakref.WeakKeyDictionary[Connection, float] = weakref.WeakKeyDictionary()
        self._pool = self._new_pool()
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    # --- connections ------------------------------------------------------------------------------
    def _new_pool(self) -> ConnectionPool[Connection]:
        pool: ConnectionPool[Connection] = ConnectionPool(
            self._dsn,
            min_size=1,
            max_size=self._pool_max,
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "context": _ADAPTERS,
                "connect_timeout": CONNECT_TIMEOUT_S,
                # Server-side prepared from the first repeat: every statement here is one
                # of a few fixed texts, run again and again (a status poll, a claim).
                "prepare_threshold": PREPARE_THRESHOLD,
            },
            timeout=self._acquire_timeout_s,
            name="kontext-job-store",
            open=False,
        )
        pool.open()
        return pool

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"the PostgreSQL job store ({self._where}) is unavailable ({exc});"
            " retry once it is back"
        )

    def _mark_suspect(self, exc: BaseException) -> None:
        with self._pool_lock:
            self._pool_suspect = True
            self._last_failure = exc

    def _healthy_pool(self) -> ConnectionPool[Connection]:
        """The pool; after a connection failure, first a probe and, if the server answers,
        a fresh pool (the old one's connections all died with the server).

        A circuit breaker keeps an outage cheap for callers: one probe at a time, and after a
        failed probe none for as long as it took; meanwhile every call fails at once with
        ``StoreUnavailableError`` instead of each waiting out a connection attempt."""
        with self._pool_lock:
            if self._closed:
                raise StoreError(f"the job store ({self._where}) is closed")
            if not self._pool_suspect:
                return self._pool
            if self._probing or time.monotonic() < self._next_probe_at:
                raise self._unavailable(self._last_failure)
            self._probing = True
        started = time.monotonic()
        try:
            psycopg.connect(self._dsn, connect_timeout=PROBE_TIMEOUT_S).close()
        except psycopg.Error as exc:
            with self._pool_lock:
                self._probing = False
                # Refused at once (the server is stopped): the next call may probe at once.
                # Timed out (unreachable): that long again before the next probe.
                self._next_probe_at = 2 * time.monotonic() - started
                self._last_failure = exc
            raise self._unavailable(exc) from exc
        with self._pool_lock:
            stale, self._pool = self._pool, self._new_pool()
            self._pool_suspect = self._probing = False
        stale.close(timeout=0)  # connections still out are closed when given back
        return self._pool

    def _acquire(self) -> tuple[ConnectionPool[Connection], Connection]:
        """A live connection and its pool. A connection that fails its check marks the pool
        suspect and the call goes through ``_healthy_pool`` once more: a server that
        restarted while we were idle costs a probe and a new pool, not an error; a server
        that is down answers at once (no waiting out the pool's own reconnection)."""
        for attempt in (1, 2):
            pool = self._healthy_pool()
            conn = self._getconn(pool)
            try:
                # A round trip (an empty query) only for a connection idle for CHECK_IDLE_S:
                # one in use a moment ago is lent as is (a status poll is one round trip, not
                # two). If the server went away within that moment, the call itself fails and
                # the pool is marked suspect as after any lost connection.
                used_at = self._used_at.get(conn)
                if used_at is None or time.monotonic() - used_at > CHECK_IDLE_S:
                    ConnectionPool.check_connection(conn)
            except psycopg.Error as exc:
                pool.putconn(conn)  # a broken connection is discarded, not reused
                self._mark_suspect(exc)
                if attempt == 2:
                    raise self._unavailable(exc) from exc
                continue
            return pool, conn
        raise AssertionError("unreachable")

    def _getconn(self, pool: ConnectionPool[Connection]) -> Connection:
        """A connection of ``pool`` within ``acquire_timeout_s``, asked for in short slices:
        a call waiting for one (the pool busy, or refilling itself after the server went
        away) gives up as soon as another call has found the server unreachable, instead of
        waiting out the whole timeout."""
        deadline = time.monotonic() + self._acquire_timeout_s
        while True:
            slice_s = min(_ACQUIRE_SLICE_S, max(0.0, deadline - time.monotonic()))
            try:
                return pool.getconn(timeout=slice_s)
            except PoolTimeout as exc:
                if self._pool_suspect:
                    raise self._unavailable(self._last_failure) from exc
                if time.monotonic() >= deadline:
                    self._mark_suspect(exc)
                    raise self._unavailable(exc) from exc
            except psycopg.OperationalError as exc:
                self._mark_suspect(exc)
                raise self._unavailable(exc) from exc

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """A pooled autocommit connection; psycopg errors leave as ``StoreError``
        (``StoreUnavailableError`` when the server cannot be reached)."""
        pool, conn = self._acquire()
        try:
            yield conn
            self._used_at[conn] = time.monotonic()
        except psycopg.OperationalError as exc:
            self._mark_suspect(exc)
            raise self._unavailable(exc) from exc
        except psycopg.Error as exc:
            raise StoreError(f"the PostgreSQL job store ({self._where}) failed: {exc}") from exc
        finally:
            pool.putconn(conn)

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        with self._connection() as conn, conn.transaction():
            yield conn

    @contextmanager
    def _hint_transaction(self) -> Iterator[Connection]:
        """A transaction for hints (progress, log lines), sent in one round trip (pipeline)
        and committed without waiting for its WAL flush (``synchronous_commit`` off for it
        alone). Visible at once like any commit; a crash of PostgreSQL itself may lose the
        last fraction of a second of them (up to 3 x ``wal_writer_delay``), never a job's
        status, which keeps durable commits. Read results after the block."""
        with self._connection() as conn, conn.pipeline(), conn.transaction():
            conn.execute("SET LOCAL synchronous_commit TO off")
            yield conn

    def _fetchone(self, query: str, params: Any = None) -> DictRow | None:
        with self._connection() as conn:
            return conn.execute(query, params).fetchone()

    def _fetchall(self, query: str, params: Any = None) -> list[DictRow]:
        with self._connection() as conn:
            return conn.execute(query, params).fetchall()

    def _rowcount(self, query: str, params: Any = None) -> int:
        with self._connection() as conn:
            return conn.execute(query, params).rowcount

    @staticmethod
    def _json(value: Any) -> Jsonb:
        return Jsonb(value)

    def _insert_api_key(self, params: tuple[str, str, str, float]) -> DictRow:
        with self._connection() as conn:
            try:
                row = conn.execute(PYFORMAT.insert_api_key, params).fetchone()
            except pg_errors.UniqueViolation as exc:
                raise StoreError(f"cannot create API key {params[0]!r}: {exc}") from exc
        assert row is not None  # INSERT ... RETURNING returns the row
        return row

    def _migrate(self) -> None:
        with self._transaction() as conn:
            # Several processes may start at once: one applies, the others wait and see.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version"
                " (version integer PRIMARY KEY, applied_at double precision NOT NULL)"
            )
            self._apply_migrations(conn.execute, f"({self._where})", SCHEMA_VERSION, MIGRATIONS)

    def server_version(self) -> str:
        """PostgreSQL's version string (e.g. ``15.18``), for diagnostics."""
        row = self._fetchone("SELECT current_setting('server_version') AS version")
        return "" if row is None else str(row["version"])

    def ping(self) -> None:
        self._fetchone("SELECT 1")  # through the outage breaker, like every call

    def close(self) -> None:
        """Close the pool and the listening connection; the store cannot be used afterwards."""
        with self._pool_lock:
            self._closed = True
        self._ranks.close()
        with self._listen_lock:
            self._drop_listener()
        self._pool.close()

    # --- API side ---------------------------------------------------------------------------------
    def submit(self, job: NewJob) -> tuple[Job, bool]:
        now = self._clock()
        with self._connection() as conn:
            (row,) = self._insert_all(conn, [job], now)
            done = self._submitted(conn, job, row, now, with_position=False)
        self._note_submitted([done])
        return done.job, done.created

    def submit_many(self, jobs: Sequence[NewJob]) -> list[Submitted]:
        """One statement in autocommit inserts the batch (its columns as arrays): one round
        trip, one commit (one WAL flush). Positions come from ``QueueRanks`` (no count of the
        line)."""
        if not jobs:
            return []
        self._ranks.prepare()  # its picture must predate these inserts
        now = self._clock()
        with self._connection() as conn:
            rows = self._insert_all(conn, jobs, now)
            pairs = zip(jobs, rows, strict=True)
            done = [self._submitted(conn, job, row, now) for job, row in pairs]
        # In order: each job's position counts the jobs noted before it, not those after.
        created = [one.job for one in done if one.created]
        ahead = iter(self._ranks.queued_positions((j.engine, j.priority, j.seq) for j in created))
        return [Submitted(one.job, True, next(ahead)) if one.created else one for one in done]

    def _insert_all(
        self, conn: Connection, jobs: Sequence[NewJob], now: float
    ) -> list[DictRow | None]:
        """Each inserted job's row (``id``, ``seq``), or ``None`` where its idempotency key
        was taken."""
        values = (job_insert_values(job, now, dumps) for job in jobs)
        columns = [list(column) for column in zip(*values, strict=True)]
        inserted = {row["id"]: row for row in conn.execute(_INSERT_JOBS_SQL, columns)}
        return [inserted.get(job.id) for job in jobs]

    def _submitted(
        self,
        conn: Connection,
        job: NewJob,
        row: DictRow | None,
        now: float,
        *,
        with_position: bool = True,
    ) -> Submitted:
        """The outcome of one insert (position still 0); an idempotency conflict reads the
        earlier job, or inserts again if that one was purged meanwhile."""
        if row is not None:
            return Submitted(new_job(job, row["seq"], now), True, 0)
        return self._submit_one(conn, job, with_position=with_position)

    def _submit_one(
        self, conn: Connection, job: NewJob, *, with_position: bool = True
    ) -> Submitted:
        """After an idempotency conflict: the earlier job (with its position), or, if it was
        purged in between (a very old key), a new insert."""
        for _ in range(_SUBMIT_TRIES):
            existing = conn.execute(
                PYFORMAT.job_by_idempotency_key, (job.owner or "", job.idempotency_key)
            ).fetchone()
            if existing is not None:
                found = job_from_row(existing)
                ahead = self.queue_position_of(found) if with_position else None
                return Submitted(found, False, ahead or 0)
            now = self._clock()
            (row,) = self._insert_all(conn, [job], now)
            if row is not None:
                return Submitted(new_job(job, row["seq"], now), True, 0)
        raise StoreError(f"cannot insert job {job.id!r}: its idempotency key kept conflicting")

    def _queued_lines(self) -> list[tuple[str, int, array[int]]]:
        """Every queued job's seq, by line (``QueueRanks``' loader): one statement; each
        line in chunks of at most ``_SEQ_CHUNK`` seqs (a range of seqs each), every chunk one
        string of 8-byte big-endian integers in binary, turned into an array in C (a Python
        int per job would hold the GIL ~10 ms per 100k jobs). The rows are streamed, one
        chunk at a time: at 1M queued, one 8 MB value made libpq and psycopg hold the GIL
        ~5 ms at once receiving and copying it (a stall of every status poll meanwhile)."""
        query = (
            "SELECT engine, priority, string_agg(int8send(seq), ''::bytea ORDER BY seq) AS seqs"
            f" FROM jobs WHERE status = 'queued' GROUP BY engine, priority, seq / {_SEQ_CHUNK}"
            f" ORDER BY engine, priority, seq / {_SEQ_CHUNK}"
        )
        with self._connection() as conn:
            return [
                (row["engine"], row["priority"], _int8_array(row["seqs"]))
                for row in conn.cursor(binary=True).stream(query)
            ]

    def queue_depth(self) -> int:
        """From ``QueueRanks`` (no count of the table: submit's queue limits ask it for every
        batch), with the freshness of a position."""
        return self._ranks.depth()

    def count_queued(self, owner: str | None) -> int:
        # Two spellings, because IS NOT DISTINCT FROM cannot use the owner index.
        if owner is None:
            row = self._fetchone(
                "SELECT count(*) AS n FROM jobs WHERE status = 'queued' AND owner IS NULL"
            )
        else:
            row = self._fetchone(
                "SELECT count(*) AS n FROM jobs WHERE status = 'queued' AND owner = %s", (owner,)
            )
        return 0 if row is None else int(row["n"])

    def queue_depths(self) -> list[QueueDepth]:
        """Only (endpoint, priority) pairs with a queued or running job, sorted."""
        rows = self._fetchall(
            "SELECT endpoint, priority,"
            " count(*) FILTER (WHERE status = 'queued') AS queued,"
            " count(*) FILTER (WHERE status = 'running') AS running"
            " FROM jobs WHERE status IN ('queued', 'running')"
            ' GROUP BY endpoint, priority ORDER BY endpoint COLLATE "C", priority'
        )
        return [queue_depth_from_row(row) for row in rows]

    def request_cancel(self, job_id: str) -> CancelOutcome:
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT status FROM jobs WHERE id = %s FOR NO KEY UPDATE", (job_id,)
            ).fetchone()
            if row is None:
                return CancelOutcome.NOT_FOUND
            status = JobStatus(row["status"])
            if status.is_final:
                return CancelOutcome.ALREADY_FINISHED
            now = self._clock()
            if status is JobStatus.QUEUED:
                left = conn.execute(
                    _closing(
                        "UPDATE jobs SET status = 'canceled', cancel_requested = true,"
                        f" error = %(error)s, error_type = %(error_type)s, {_FINAL_COLUMNS}"
                        " WHERE id = %(job_id)s"
                    ),
                    self._closing_params(now, "WARN", "canceled", job_id=job_id),
                ).fetchall()
                canceled = True
            else:
                conn.execute(PYFORMAT.request_cancel, (job_id,))
                self._insert_event(conn, job_id, now, "WARN", "cancellation requested")
                canceled = False
        if not canceled:
            return CancelOutcome.REQUESTED
        self._note(False, left)
        return CancelOutcome.CANCELED

    def _closing_params(self, now: float, level: str, message: str, **more: Any) -> dict[str, Any]:
        return {
            "now": now,
            "retention_s": self._default_retention_s,
            "level": level,
            "message": message,
            "error": CANCELLED_ERROR,
            "error_type": CANCELLED_ERROR_TYPE,
            **more,
        }

    # --- worker side ------------------------------------------------------------------------------
    def claim(self, worker_id: str, lease_s: float, *, engine: str = "local") -> Job | None:
        """Take the best queued job of ``engine`` (skipping rows other claimers hold). Never
        starts a job past its start deadline: those are failed with ``request_timeout``."""
        now = self._clock()
        with self._connection() as conn:
            expired = self._expire_unstarted(conn, now)
            row = conn.execute(
                "WITH claimed AS (UPDATE jobs SET status = 'running', attempts = attempts + 1,"
                " lease_owner = %(worker_id)s, lease_until = %(lease_until)s,"
                " started_at = %(now)s, progress_step = NULL, progress_total = NULL"
                " WHERE seq = (SELECT seq FROM jobs WHERE status = 'queued'"
                "   AND engine = %(engine)s"
                "   AND (start_deadline_at IS NULL OR start_deadline_at >= %(now)s)"
                "   ORDER BY priority, seq LIMIT 1 FOR UPDATE SKIP LOCKED)"
                " RETURNING *),"
                " started AS (INSERT INTO job_events (job_id, at, level, message)"
                "   SELECT id, %(now)s, 'INFO', 'started (attempt ' || attempts || ')'"
                "   FROM claimed)"
                " SELECT * FROM claimed",
                {
                    "worker_id": worker_id,
                    "lease_until": now + lease_s,
                    "now": now,
                    "engine": engine,
                },
            ).fetchone()
        self._note(False, expired if row is None else [*expired, row])
        return None if row is None else job_from_row(row)

    def peek_queued(self, limit: int, *, engine: str = "local") -> list[Job]:
        """The next ``limit`` jobs ``claim`` would take, in its order; a plain read (no row
        locks, so it never delays a claimer, and rows being claimed right now may still be
        listed). Jobs past their start deadline are left out, as ``claim`` skips them."""
        if limit <= 0:
            return []
        rows = self._fetchall(PYFORMAT.peek_queued, (engine, self._clock(), limit))
        return [job_from_row(row) for row in rows]

    def wait_for_work(self, timeout_s: float, *, engine: str = "local") -> None:
        """LISTENs for ``kontext_jobs`` and returns on the first notification, at once if a
        job of ``engine`` is already queued, or after ``timeout_s``. While PostgreSQL is
        unreachable it just waits out the timeout (the caller's next ``claim`` reports the
        outage). One
        thread listens at a time; another caller meanwhile just waits out its timeout."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        if not self._listen_lock.acquire(timeout=max(timeout_s, 0.0)):
            return
        try:
            try:
                conn = self._listening_connection()
                for _ in conn.notifies(timeout=0):  # drop stale hints: the check below counts
                    pass
                queued = conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'queued'"
                    " AND engine = %s) AS any",
                    (engine,),
                ).fetchone()
                if queued is not None and queued["any"]:
                    return
                remaining_s = deadline - time.monotonic()
                if remaining_s > 0:
                    for _ in conn.notifies(timeout=remaining_s, stop_after=1):
                        pass
                return
            except psycopg.Error:
                self._drop_listener()
        finally:
            self._listen_lock.release()
        time.sleep(max(0.0, deadline - time.monotonic()))

    def _listening_connection(self) -> Connection:
        if self._closed:
            raise StoreError(f"the job store ({self._where}) is closed")
        if self._listener is None or self._listener.closed:
            conn = psycopg.connect(
                self._dsn, autocommit=True, row_factory=dict_row, connect_timeout=5
            )
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self._listener = conn
        return self._listener

    def _drop_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def release(self, job_id: str, worker_id: str, attempt: int) -> bool:
        """Fenced hand-back: queued again in its place (same priority and seq), ``attempts``
        back down, lease and progress cleared. A job whose cancellation was requested ends
        canceled instead. ``False`` if this attempt no longer owns the job."""
        now = self._clock()
        fence = {"job_id": job_id, "worker_id": worker_id, "attempt": attempt}
        with self._connection() as conn:
            canceled = conn.execute(
                _closing(
                    "UPDATE jobs SET status = 'canceled', error = %(error)s,"
                    f" error_type = %(error_type)s, {_FINAL_COLUMNS}"
                    f" WHERE {_FENCE} AND cancel_requested"
                ),
                self._closing_params(now, "WARN", "canceled", **fence),
            ).fetchall()
            if canceled:
                return True
            released = conn.execute(
                "WITH released AS (UPDATE jobs SET status = 'queued', attempts = attempts - 1,"
                " lease_owner = NULL, lease_until = NULL, started_at = NULL,"
                f" progress_step = NULL, progress_total = NULL WHERE {_FENCE}"
                " RETURNING id, engine, priority, seq),"
                " logged AS (INSERT INTO job_events (job_id, at, level, message)"
                "   SELECT id, %(now)s, 'WARN', %(message)s FROM released)"
                " SELECT id, engine, priority, seq,"
                f" pg_notify('{NOTIFY_CHANNEL}', '') FROM released",
                {**fence, "now": now, "message": RELEASED_EVENT},
            ).fetchall()
        self._note(True, released)
        return len(released) == 1

    def heartbeat(self, job_id: str, worker_id: str, attempt: int, lease_s: float) -> bool:
        params = (self._clock() + lease_s, job_id, worker_id, attempt)
        return self._rowcount(PYFORMAT.heartbeat, params) == 1

    def set_progress(self, job_id: str, worker_id: str, attempt: int, progress: Progress) -> bool:
        """Fenced; a hint, committed without waiting for the WAL flush
        (``_hint_transaction``)."""
        with self._hint_transaction() as conn:
            cursor = conn.execute(
                "WITH moved AS (UPDATE jobs SET progress_step = %(step)s,"
                f" progress_total = %(total)s WHERE {_FENCE} RETURNING id)"
                " INSERT INTO job_events (job_id, at, level, message, data)"
                " SELECT id, %(now)s, 'INFO', %(message)s, %(data)s FROM moved RETURNING id",
                {
                    "step": progress.step,
                    "total": progress.total,
                    "job_id": job_id,
                    "worker_id": worker_id,
                    "attempt": attempt,
                    "now": self._clock(),
                    "message": f"step {progress.step}/{progress.total}",
                    "data": Jsonb({"step": progress.step, "total": progress.total}),
                },
            )
        return len(cursor.fetchall()) == 1

    def add_event(
        self, job_id: str, message: str, level: str = "INFO", data: dict[str, Any] | None = None
    ) -> None:
        """Append a log line (not fenced), committed without waiting for the WAL flush
        (``_hint_transaction``). Raises ``StoreError`` for an unknown job."""
        with self._hint_transaction() as conn:
            cursor = self._event_insert(conn, job_id, self._clock(), level, message, data)
        if cursor.fetchone() is None:
            raise StoreError(f"cannot add an event to unknown job {job_id!r}")

    def finish(
        self,
        job_id: str,
        worker_id: str,
        attempt: int,
        status: JobStatus,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        error_type: str | None = None,
    ) -> bool:
        """Fenced completion. A ``canceled`` finish without an error gets fal's
        ``Request cancelled`` / ``client_cancelled``."""
        error, error_type = finish_error(status, error, error_type)
        level, message = final_event(status, error)
        rows = self._fetchall(
            _closing(
                "UPDATE jobs SET status = %(status)s, result = %(result)s, error = %(error)s,"
                f" error_type = %(error_type)s, {_FINAL_COLUMNS} WHERE {_FENCE}"
            ),
            self._closing_params(
                self._clock(),
                level,
                message,
                status=status.value,
                result=None if result is None else Jsonb(result),
                error=error,
                error_type=error_type,
                job_id=job_id,
                worker_id=worker_id,
                attempt=attempt,
            ),
        )
        return len(rows) == 1

    # --- maintenance ------------------------------------------------------------------------------
    def requeue_expired(self) -> int:
        """Expired leases: canceled if cancellation was requested, else back to queued
        (same priority and seq) while attempts remain, else failed with
        ``runner_disconnected``. Rows another process is handling right now are skipped
        (the next call sees them). Returns how many jobs changed."""
        now = self._clock()
        expired = (
            "seq IN (SELECT seq FROM jobs WHERE status = 'running' AND lease_until < %(now)s"
            " AND {condition} FOR UPDATE SKIP LOCKED)"
        )
        with self._connection() as conn:
            canceled = conn.execute(
                _closing(
                    "UPDATE jobs SET status = 'canceled', error = %(error)s,"
                    f" error_type = %(error_type)s, {_FINAL_COLUMNS}"
                    f" WHERE {expired.format(condition='cancel_requested')}"
                ),
                self._closing_params(now, "WARN", "canceled"),
            ).fetchall()
            failed = conn.execute(
                _closing(
                    "UPDATE jobs SET status = 'failed', error = %(lost)s,"
                    f" error_type = %(lost_type)s, {_FINAL_COLUMNS}"
                    f" WHERE {expired.format(condition='attempts >= max_attempts')}"
                ),
                self._closing_params(
                    now,
                    "ERROR",
                    "worker lost; no attempts left",
                    lost=WORKER_LOST_ERROR,
                    lost_type=WORKER_LOST_ERROR_TYPE,
                ),
            ).fetchall()
            requeued = conn.execute(
                "WITH requeued AS (UPDATE jobs SET status = 'queued', lease_owner = NULL,"
                " lease_until = NULL, started_at = NULL, progress_step = NULL,"
                " progress_total = NULL"
                f" WHERE {expired.format(condition='NOT cancel_requested')}"
                " RETURNING id, engine, priority, seq),"
                " logged AS (INSERT INTO job_events (job_id, at, level, message)"
                "   SELECT id, %(now)s, 'WARN', 'worker lost; retrying' FROM requeued)"
                " SELECT id, engine, priority, seq FROM requeued",
                {"now": now},
            ).fetchall()
            if requeued:
                conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
        self._note(True, requeued)
        return len(canceled) + len(failed) + len(requeued)

    def expire_unstarted(self) -> int:
        with self._connection() as conn:
            expired = self._expire_unstarted(conn, self._clock())
        self._note(False, expired)
        return len(expired)

    def _note(self, queued: bool, rows: Sequence[DictRow]) -> None:
        """Committed: these jobs (rows with engine, priority, seq) entered (``queued``) or
        left the queue; ``QueueRanks`` learns of it."""
        note = self._ranks.note_queued if queued else self._ranks.note_left
        for row in rows:
            note(row["engine"], row["priority"], row["seq"])

    def _expire_unstarted(self, conn: Connection, now: float) -> list[DictRow]:
        """Fails the queued jobs past their start deadline; returns their rows."""
        return conn.execute(
            _closing(
                "UPDATE jobs SET status = 'failed', error = %(timeout)s,"
                f" error_type = %(timeout_type)s, {_FINAL_COLUMNS}"
                " WHERE seq IN (SELECT seq FROM jobs WHERE status = 'queued'"
                "   AND start_deadline_at IS NOT NULL AND start_deadline_at < %(now)s"
                "   FOR UPDATE SKIP LOCKED)"
            ),
            self._closing_params(
                now,
                "ERROR",
                f"failed: {START_TIMEOUT_ERROR}",
                timeout=START_TIMEOUT_ERROR,
                timeout_type=START_TIMEOUT_ERROR_TYPE,
            ),
        ).fetchall()

    def purge_expired(self, limit: int = 500) -> list[PurgedJob]:
        """Deletes up to ``limit`` finished jobs past ``expires_at`` (oldest expiry first);
        their events and outbox rows go with them (``ON DELETE CASCADE``). Call it again
        while it returns ``limit`` jobs."""
        rows = self._fetchall(
            "WITH purged AS (DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs"
            "   WHERE expires_at <= %s ORDER BY expires_at, seq LIMIT %s FOR UPDATE SKIP LOCKED)"
            " RETURNING id, result, expires_at, seq)"
            " SELECT id, result FROM purged ORDER BY expires_at, seq",
            (self._clock(), limit),
        )
        return [purged_from_row(row) for row in rows]

    @staticmethod
    def _insert_event(
        conn: Connection,
        job_id: str,
        at: float,
        level: str,
        message: str,
        data: dict[str, Any] | None = None,
    ) -> bool:
        """Appends an event after locking its job's row; ``False`` if there is no such job."""
        cursor = PostgresJobStore._event_insert(conn, job_id, at, level, message, data)
        return cursor.fetchone() is not None

    @staticmethod
    def _event_insert(
        conn: Connection,
        job_id: str,
        at: float,
        level: str,
        message: str,
        data: dict[str, Any] | None = None,
    ) -> psycopg.Cursor[DictRow]:
        """The event insert of ``_insert_event``; its cursor has the new id's row, if any."""
        return conn.execute(
            "WITH job AS (SELECT id FROM jobs WHERE id = %s FOR NO KEY UPDATE)"
            " INSERT INTO job_events (job_id, at, level, message, data)"
            " SELECT id, %s, %s, %s, %s FROM job RETURNING id",
            (job_id, at, level, message, Jsonb(data or {})),
        )

    # --- webhook outbox ---------------------------------------------------------------------------
    def claim_webhooks(self, claimer: str, limit: int, lease_s: float) -> list[WebhookDelivery]:
        """Due deliveries (not delivered, not given up), leased to ``claimer`` for ``lease_s``.
        Rows under an unexpired claim, or being claimed by another process right now, are
        not handed out: each delivery goes to one API process."""
        now = self._clock()
        rows = self._fetchall(
            "UPDATE webhook_outbox SET claimed_by = %(claimer)s, claimed_until = %(until)s"
            " WHERE id IN (SELECT id FROM webhook_outbox"
            "   WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_attempt_at <= %(now)s"
            "   AND (claimed_until IS NULL OR claimed_until < %(now)s)"
            "   ORDER BY next_attempt_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
            " RETURNING id, job_id, url, attempts, next_attempt_at",
            {"claimer": claimer, "until": now + lease_s, "now": now, "limit": limit},
        )
        return deliveries_from_rows(rows)
