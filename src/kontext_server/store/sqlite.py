"""``SQLiteJobStore``: the embedded job store (one file, several processes on one host).

How it stays correct under concurrency:

* WAL mode, so readers (status polls) never block the writer and vice versa.
* One connection per thread (``threading.local``), in autocommit mode. Every write that
  touches more than one row or table runs in an explicit ``BEGIN IMMEDIATE`` transaction:
  the write lock is taken up front, so two writers queue on ``busy_timeout`` instead of
  failing with a lock-upgrade error. Transactions are short and never span GPU work.
* Worker writes are fenced by ``(id, lease_owner, attempts, status='running')``.
* ``wait_for_work`` has no cross-process signal to wait on: it wakes at once on a submit or
  requeue made through this store object, and otherwise polls a cheap query.

Several processes (the API process and its workers) may open the same file; the schema is
created or migrated on open under the write lock, so concurrent openers are safe.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kontext_server.domain.errors import StoreError
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
from kontext_server.store.queue_ranks import QueueRanks
from kontext_server.store.rows import (
    Row,
    deliveries_from_rows,
    dumps,
    job_from_row,
    job_insert_values,
    new_job,
    purged_from_row,
    queue_depth_from_row,
)
from kontext_server.store.sql_store import SqlJobStore
from kontext_server.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION
from kontext_server.store.statements import FENCE, QMARK

__all__ = [
    "CANCELLED_ERROR",
    "CANCELLED_ERROR_TYPE",
    "START_TIMEOUT_ERROR",
    "START_TIMEOUT_ERROR_TYPE",
    "WORKER_LOST_ERROR",
    "WORKER_LOST_ERROR_TYPE",
    "SQLiteJobStore",
]

BUSY_TIMEOUT_MS = 10_000
WORK_POLL_INTERVAL_S = 0.02  # wait_for_work's look at the table when no in-process signal came
_INSERT_JOB_SQL = f"{QMARK.insert_job} RETURNING seq"

_QUEUE_POSITION_SQL = (
    "SELECT"
    " (SELECT coalesce(sum(queued), 0) FROM queue_counts"
    "  WHERE engine = j.engine AND priority < j.priority)"
    " + CASE WHEN j.seq - (SELECT min(seq) FROM jobs WHERE status = 'queued'"
    "                      AND engine = j.engine AND priority = j.priority)"
    "          <= (SELECT max(seq) FROM jobs WHERE status = 'queued'"
    "              AND engine = j.engine AND priority = j.priority) - j.seq"
    "   THEN (SELECT count(*) FROM jobs WHERE status = 'queued'"
    "         AND engine = j.engine AND priority = j.priority AND seq < j.seq)"
    "   ELSE (SELECT queued FROM queue_counts"
    "         WHERE engine = j.engine AND priority = j.priority) - 1"
    "        - (SELECT count(*) FROM jobs WHERE status = 'queued'"
    "           AND engine = j.engine AND priority = j.priority AND seq > j.seq)"
    "   END"
    " FROM jobs AS j WHERE j.id = ? AND j.status = 'queued'"
)


def _hex_array(text: str) -> array[int]:
    """16 hex digits per integer (big-endian) as an ``array``. SQLite feeds ``group_concat``
    the ordered subquery's rows in order (an aggregate's subquery with ORDER BY is not
    flattened) without promising it: a sample of pairs is checked, and sorted if one is off."""
    seqs = array("q")
    seqs.frombytes(bytes.fromhex(text))
    if sys.byteorder == "little":
        seqs.byteswap()
    step = max(1, len(seqs) // 64)
    if any(seqs[i] >= seqs[i + 1] for i in range(0, len(seqs) - 1, step)):
        return array("q", sorted(seqs))
    return seqs


class SQLiteJobStore(SqlJobStore):
    """The ``JobStore`` protocol on one SQLite file. Thread-safe and multi-process safe.

    ``path`` is a file path; ``":memory:"`` gives a private temporary file removed on
    ``close()`` (a real in-memory database would be private to one connection, and this
    store uses one connection per thread). ``clock`` returns unix seconds; tests inject a
    fake one. ``default_retention_s`` is how long a finished job is kept when its
    ``NewJob.retention_s`` is ``None``.
    """

    waits_on_network = False  # a local file: calls stay on the API's event loop
    _sql = QMARK
    _list_api_keys_sql = "SELECT * FROM api_keys ORDER BY created_at, id"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        default_retention_s: float = DEFAULT_RETENTION_S,
        work_poll_s: float = WORK_POLL_INTERVAL_S,
    ):
        super().__init__(clock=clock, default_retention_s=default_retention_s)
        self._work_poll_s = work_poll_s
        self._work_signal = threading.Condition()
        self._temp_dir: str | None = None
        if str(path) == ":memory:":
            self._temp_dir = tempfile.mkdtemp(prefix="kontext-store-")
            path = Path(self._temp_dir) / "jobs.db"
        self._path = Path(path)
        self._local = threading.local()
        self._connections_lock = threading.Lock()
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        # Writers of this process queue on this lock instead of on SQLite's busy handler,
        # which sleeps 1-100 ms between retries and leaves the database idle meanwhile (the
        # API's submit throughput fell to a third under 16 concurrent submits). Other
        # processes still meet busy_timeout.
        self._write_lock = threading.RLock()
        self._moves: list[tuple[bool, sqlite3.Row]] = []  # of the open write (under the lock)
        self._pid = os.getpid()
        self._closed = False
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    @property
    def path(self) -> Path:
        return self._path

    # --- connections and transactions -------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"the job store {self._path} is closed")
        if os.getpid() != self._pid:
            self._forget_inherited_connections()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def _connect(self) -> sqlite3.Connection:
        # check_same_thread=False only so that close() may close every thread's connection;
        # each connection is otherwise used by its own thread alone.
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        with self._connections_lock:
            self._close_connections_of_finished_threads()
            self._connections.append((threading.current_thread(), conn))
        return conn

    def _close_connections_of_finished_threads(self) -> None:
        # Servers run short-lived threads (thread pools shrink): do not leak their handles.
        alive = []
        for thread, conn in self._connections:
            if thread.is_alive():
                alive.append((thread, conn))
            else:
                conn.close()
        self._connections = alive

    def _forget_inherited_connections(self) -> None:
        # After fork() the parent's connections must not be used (nor closed) by the child.
        self._pid = os.getpid()
        self._local = threading.local()
        self._connections_lock = threading.Lock()
        self._connections = []
        self._write_lock = threading.RLock()
        self._moves = []
        self._ranks = QueueRanks(self._queued_lines, max_age_s=self._ranks.max_age_s)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the database's write lock from its first statement."""
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                self._moves.clear()
                if conn.in_transaction:  # also after a failed COMMIT: never leave one open
                    conn.execute("ROLLBACK")
                raise
            moves, self._moves = self._moves, []
        for queued, row in moves:  # committed: the queue positions learn of it
            note = self._ranks.note_queued if queued else self._ranks.note_left
            note(row["engine"], row["priority"], row["seq"])

    def _moved(self, queued: bool, rows: Iterable[sqlite3.Row]) -> None:
        """Inside ``_write``: these jobs (rows with engine, priority, seq) entered
        (``queued``) or left the queue; told to ``QueueRanks`` once the transaction commits."""
        self._moves.extend((queued, row) for row in rows)

    # --- SqlJobStore's dialect: one statement on this thread's connection (autocommit) ---------
    def _fetchone(self, sql: str, params: Any = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._conn().execute(sql, params).fetchone()
        return row

    def _fetchall(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, params).fetchall()

    def _rowcount(self, sql: str, params: Any = ()) -> int:
        return self._conn().execute(sql, params).rowcount

    @staticmethod
    def _json(value: Any) -> str:
        return dumps(value)

    def _insert_api_key(self, params: tuple[str, str, str, float]) -> Row:
        try:
            row: sqlite3.Row = self._conn().execute(QMARK.insert_api_key, params).fetchone()
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"cannot create API key {params[0]!r}: {exc}") from exc
        return row

    def _migrate(self) -> None:
        with self._write() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version"
                " (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            self._apply_migrations(conn.execute, str(self._path), SCHEMA_VERSION, MIGRATIONS)

    def ping(self) -> None:
        self._conn().execute("SELECT 1 FROM jobs LIMIT 1").fetchone()  # reads the file

    def close(self) -> None:
        """Close every thread's connection; the store cannot be used afterwards."""
        self._ranks.close()
        with self._connections_lock:
            for _, conn in self._connections:
                conn.close()
            self._connections = []
            self._closed = True
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)

    # --- API side ---------------------------------------------------------------------------------
    def submit(self, job: NewJob) -> tuple[Job, bool]:
        (done,) = self.submit_many([job])
        return done.job, done.created

    def submit_many(self, jobs: Sequence[NewJob]) -> list[Submitted]:
        if not jobs:
            return []
        with self._write() as conn:
            done = [self._submit_one(conn, job) for job in jobs]
        self._note_submitted(done)
        if any(one.created for one in done):
            self._signal_work()
        return done

    def _submit_one(self, conn: sqlite3.Connection, job: NewJob) -> Submitted:
        if job.idempotency_key is not None:
            existing = conn.execute(
                QMARK.job_by_idempotency_key, (job.owner or "", job.idempotency_key)
            ).fetchone()
            if existing is not None:
                found = job_from_row(existing)
                return Submitted(found, False, self._position_in(conn, found.id))
        now = self._clock()
        try:
            (seq,) = conn.execute(_INSERT_JOB_SQL, job_insert_values(job, now, dumps)).fetchone()
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"cannot insert job {job.id!r}: {exc}") from exc
        # The newest job of its line: every other queued job of its engine at its priority or
        # a better one is ahead of it, and queue_counts (kept by triggers) has them all.
        (ahead,) = conn.execute(
            "SELECT coalesce(sum(queued), 0) - 1 FROM queue_counts"
            " WHERE engine = ? AND priority <= ?",
            (job.engine, job.priority),
        ).fetchone()
        return Submitted(new_job(job, seq, now), True, int(ahead))

    def _position_in(self, conn: sqlite3.Connection, job_id: str) -> int:
        row = conn.execute(_QUEUE_POSITION_SQL, (job_id,)).fetchone()
        return 0 if row is None else int(row[0])

    def _queued_lines(self) -> list[tuple[str, int, array[int]]]:
        """Every queued job's seq, by line (``QueueRanks``' loader), in one read transaction:
        per line, the seqs in index order as one hex string, turned into an array in C (a
        Python int per job would hold the GIL ~10 ms per 100k jobs)."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            lines = conn.execute(
                "SELECT engine, priority FROM queue_counts WHERE queued > 0"
            ).fetchall()
            return [
                (engine, priority, _hex_array(self._line_hex(conn, engine, priority)))
                for engine, priority in lines
            ]
        finally:
            conn.execute("COMMIT")

    @staticmethod
    def _line_hex(conn: sqlite3.Connection, engine: str, priority: int) -> str:
        (text,) = conn.execute(
            "SELECT group_concat(printf('%016x', seq), '') FROM (SELECT seq FROM jobs"
            " WHERE status = 'queued' AND engine = ? AND priority = ? ORDER BY seq)",
            (engine, priority),
        ).fetchone()
        return text or ""

    def queue_depth(self) -> int:
        row = self._conn().execute("SELECT coalesce(sum(queued), 0) FROM queue_counts").fetchone()
        return int(row[0])

    def count_queued(self, owner: str | None) -> int:
        row = (
            self._conn()
            .execute("SELECT count(*) FROM jobs WHERE status = 'queued' AND owner IS ?", (owner,))
            .fetchone()
        )
        return int(row[0])

    def queue_depths(self) -> list[QueueDepth]:
        """Only (endpoint, priority) pairs with a queued or running job, sorted."""
        rows = (
            self._conn()
            .execute(
                "SELECT endpoint, priority,"
                " sum(status = 'queued') AS queued, sum(status = 'running') AS running"
                " FROM jobs WHERE status IN ('queued', 'running')"
                " GROUP BY endpoint, priority ORDER BY endpoint, priority"
            )
            .fetchall()
        )
        return [queue_depth_from_row(row) for row in rows]

    def request_cancel(self, job_id: str) -> CancelOutcome:
        with self._write() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return CancelOutcome.NOT_FOUND
            status = JobStatus(row["status"])
            if status.is_final:
                return CancelOutcome.ALREADY_FINISHED
            now = self._clock()
            if status is JobStatus.QUEUED:
                self._cancel_queued(conn, job_id, now)
                return CancelOutcome.CANCELED
            conn.execute(QMARK.request_cancel, (job_id,))
            self._insert_event(conn, job_id, now, "WARN", "cancellation requested")
            return CancelOutcome.REQUESTED

    def _cancel_queued(self, conn: sqlite3.Connection, job_id: str, now: float) -> None:
        rows = conn.execute(
            "UPDATE jobs SET status = 'canceled', cancel_requested = 1, error = ?,"
            " error_type = ?, finished_at = ? WHERE id = ?"
            " RETURNING id, webhook_url, engine, priority, seq",
            (CANCELLED_ERROR, CANCELLED_ERROR_TYPE, now, job_id),
        ).fetchall()
        self._close_jobs(conn, rows, now, "WARN", "canceled")
        self._moved(False, rows)

    # --- worker side ------------------------------------------------------------------------------
    def claim(self, worker_id: str, lease_s: float, *, engine: str = "local") -> Job | None:
        """Take the best queued job of ``engine``. Never starts a job past its start
        deadline: such jobs are failed with ``request_timeout`` in the same transaction."""
        if not self._anything_queued(engine):
            return None  # fast path: workers poll often; no write lock when idle
        with self._write() as conn:
            now = self._clock()
            self._expire_unstarted(conn, now)
            row = conn.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_owner = ?,"
                " lease_until = ?, started_at = ?, progress_step = NULL, progress_total = NULL"
                " WHERE seq = (SELECT seq FROM jobs WHERE status = 'queued' AND engine = ?"
                "              ORDER BY priority, seq LIMIT 1)"
                " RETURNING *",
                (worker_id, now + lease_s, now, engine),
            ).fetchone()
            if row is None:
                return None
            job = job_from_row(row)
            self._moved(False, [row])
            self._insert_event(conn, job.id, now, "INFO", f"started (attempt {job.attempts})")
        return job

    def peek_queued(self, limit: int, *, engine: str = "local") -> list[Job]:
        """The next ``limit`` jobs ``claim`` would take, in its order; a plain read (no write
        lock, nothing changes). Jobs past their start deadline are left out: ``claim`` fails
        them instead of starting them."""
        if limit <= 0 or not self._anything_queued(engine):
            return []
        rows = self._conn().execute(QMARK.peek_queued, (engine, self._clock(), limit)).fetchall()
        return [job_from_row(row) for row in rows]

    def _anything_queued(self, engine: str) -> bool:
        row = (
            self._conn()
            .execute(
                "SELECT EXISTS (SELECT 1 FROM queue_counts WHERE engine = ? AND queued > 0)",
                (engine,),
            )
            .fetchone()
        )
        return bool(row[0])

    def wait_for_work(self, timeout_s: float, *, engine: str = "local") -> None:
        """Returns as soon as a job of ``engine`` is queued (at once if one already is), or
        after ``timeout_s``. Submits through this object wake it at once; others are seen by
        a poll every ``work_poll_s``."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while not self._anything_queued(engine):
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return
            with self._work_signal:
                self._work_signal.wait(min(remaining_s, self._work_poll_s))

    def _signal_work(self) -> None:
        with self._work_signal:
            self._work_signal.notify_all()

    def release(self, job_id: str, worker_id: str, attempt: int) -> bool:
        """Fenced hand-back: the job is queued again in its place (same priority and seq),
        ``attempts`` goes back down (this attempt does not count), lease and progress are
        cleared. A job whose cancellation was requested ends canceled instead (nobody wants
        it run again). ``False`` if this attempt no longer owns the job."""
        with self._write() as conn:
            now = self._clock()
            canceled = conn.execute(
                "UPDATE jobs SET status = 'canceled', error = ?, error_type = ?,"
                f" finished_at = ?, lease_until = NULL WHERE {FENCE} AND cancel_requested = 1"
                " RETURNING id, webhook_url",
                (CANCELLED_ERROR, CANCELLED_ERROR_TYPE, now, job_id, worker_id, attempt),
            ).fetchall()
            self._close_jobs(conn, canceled, now, "WARN", "canceled")
            if canceled:
                return True
            released = conn.execute(
                "UPDATE jobs SET status = 'queued', attempts = attempts - 1, lease_owner = NULL,"
                " lease_until = NULL, started_at = NULL, progress_step = NULL,"
                f" progress_total = NULL WHERE {FENCE} RETURNING engine, priority, seq",
                (job_id, worker_id, attempt),
            ).fetchall()
            if len(released) != 1:
                return False
            self._moved(True, released)
            self._insert_event(conn, job_id, now, "WARN", RELEASED_EVENT)
        self._signal_work()
        return True

    def heartbeat(self, job_id: str, worker_id: str, attempt: int, lease_s: float) -> bool:
        with self._write_lock:
            cursor = self._conn().execute(
                QMARK.heartbeat, (self._clock() + lease_s, job_id, worker_id, attempt)
            )
        return cursor.rowcount == 1

    def set_progress(self, job_id: str, worker_id: str, attempt: int, progress: Progress) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                f"UPDATE jobs SET progress_step = ?, progress_total = ? WHERE {FENCE}",
                (progress.step, progress.total, job_id, worker_id, attempt),
            )
            if cursor.rowcount != 1:
                return False
            self._insert_event(
                conn,
                job_id,
                self._clock(),
                "INFO",
                f"step {progress.step}/{progress.total}",
                {"step": progress.step, "total": progress.total},
            )
        return True

    def add_event(
        self, job_id: str, message: str, level: str = "INFO", data: dict[str, Any] | None = None
    ) -> None:
        """Append a log line (not fenced). Raises ``StoreError`` for an unknown job."""
        try:
            with self._write_lock:
                self._insert_event(self._conn(), job_id, self._clock(), level, message, data)
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"cannot add an event to unknown job {job_id!r}") from exc

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
        with self._write() as conn:
            now = self._clock()
            rows = conn.execute(
                "UPDATE jobs SET status = ?, result = ?, error = ?, error_type = ?,"
                f" finished_at = ?, lease_until = NULL WHERE {FENCE} RETURNING id, webhook_url",
                (
                    status.value,
                    None if result is None else dumps(result),
                    error,
                    error_type,
                    now,
                    job_id,
                    worker_id,
                    attempt,
                ),
            ).fetchall()
            level, message = final_event(status, error)
            self._close_jobs(conn, rows, now, level, message)
        return len(rows) == 1

    # --- maintenance ------------------------------------------------------------------------------
    def requeue_expired(self) -> int:
        """Expired leases: canceled if cancellation was requested, else back to queued
        (same priority and seq: it keeps its place) while attempts remain, else failed with
        ``runner_disconnected``. Returns how many jobs changed."""
        with self._write() as conn:
            now = self._clock()
            canceled = conn.execute(
                "UPDATE jobs SET status = 'canceled', error = ?, error_type = ?,"
                " finished_at = ?, lease_until = NULL"
                " WHERE status = 'running' AND lease_until < ? AND cancel_requested = 1"
                " RETURNING id, webhook_url",
                (CANCELLED_ERROR, CANCELLED_ERROR_TYPE, now, now),
            ).fetchall()
            self._close_jobs(conn, canceled, now, "WARN", "canceled")
            failed = conn.execute(
                "UPDATE jobs SET status = 'failed', error = ?,"
                " error_type = ?, finished_at = ?, lease_until = NULL"
                " WHERE status = 'running' AND lease_until < ? AND attempts >= max_attempts"
                " RETURNING id, webhook_url",
                (WORKER_LOST_ERROR, WORKER_LOST_ERROR_TYPE, now, now),
            ).fetchall()
            self._close_jobs(conn, failed, now, "ERROR", "worker lost; no attempts left")
            requeued = conn.execute(
                "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_until = NULL,"
                " started_at = NULL, progress_step = NULL, progress_total = NULL"
                " WHERE status = 'running' AND lease_until < ?"
                " RETURNING id, engine, priority, seq",
                (now,),
            ).fetchall()
            self._moved(True, requeued)
            for row in requeued:
                self._insert_event(conn, row["id"], now, "WARN", "worker lost; retrying")
        if requeued:
            self._signal_work()
        return len(canceled) + len(failed) + len(requeued)

    def expire_unstarted(self) -> int:
        with self._write() as conn:
            return self._expire_unstarted(conn, self._clock())

    def _expire_unstarted(self, conn: sqlite3.Connection, now: float) -> int:
        rows = conn.execute(
            "UPDATE jobs SET status = 'failed', error = ?, error_type = ?, finished_at = ?"
            " WHERE status = 'queued' AND start_deadline_at IS NOT NULL"
            " AND start_deadline_at < ? RETURNING id, webhook_url, engine, priority, seq",
            (START_TIMEOUT_ERROR, START_TIMEOUT_ERROR_TYPE, now, now),
        ).fetchall()
        self._moved(False, rows)
        self._close_jobs(conn, rows, now, "ERROR", f"failed: {START_TIMEOUT_ERROR}")
        return len(rows)

    def purge_expired(self, limit: int = 500) -> list[PurgedJob]:
        """Deletes up to ``limit`` finished jobs past ``expires_at`` (oldest expiry first);
        their events and outbox rows go with them (``ON DELETE CASCADE``). Call it again
        while it returns ``limit`` jobs."""
        with self._write() as conn:
            rows = conn.execute(
                "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE expires_at <= ?"
                " ORDER BY expires_at, seq LIMIT ?) RETURNING id, result",
                (self._clock(), limit),
            ).fetchall()
        return [purged_from_row(row) for row in rows]

    # --- shared pieces of transactions ------------------------------------------------------------
    def _close_jobs(
        self,
        conn: sqlite3.Connection,
        rows: Sequence[sqlite3.Row],
        now: float,
        level: str,
        message: str,
    ) -> None:
        """What every move to a final status does: the expiry, the last event, the webhook."""
        for row in rows:
            conn.execute(
                "UPDATE jobs SET expires_at = finished_at + coalesce(retention_s, ?) WHERE id = ?",
                (self._default_retention_s, row["id"]),
            )
            self._insert_event(conn, row["id"], now, level, message)
            if row["webhook_url"]:
                conn.execute(
                    "INSERT INTO webhook_outbox (job_id, url, next_attempt_at, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (row["id"], row["webhook_url"], now, now),
                )

    @staticmethod
    def _insert_event(
        conn: sqlite3.Connection,
        job_id: str,
        at: float,
        level: str,
        message: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        conn.execute(
            "INSERT INTO job_events (job_id, at, level, message, data) VALUES (?, ?, ?, ?, ?)",
            (job_id, at, level, message, dumps(data or {})),
        )

    # --- webhook outbox ---------------------------------------------------------------------------
    def claim_webhooks(self, claimer: str, limit: int, lease_s: float) -> list[WebhookDelivery]:
        """Due deliveries (not delivered, not given up), leased to ``claimer`` for ``lease_s``.
        A row under an unexpired claim is never handed out again, even to the same claimer,
        so a delivery in flight is not sent twice."""
        with self._write() as conn:
            now = self._clock()
            rows = conn.execute(
                "UPDATE webhook_outbox SET claimed_by = ?, claimed_until = ?"
                " WHERE id IN (SELECT id FROM webhook_outbox"
                "   WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_attempt_at <= ?"
                "   AND (claimed_until IS NULL OR claimed_until < ?)"
                "   ORDER BY next_attempt_at, id LIMIT ?)"
                " RETURNING id, job_id, url, attempts, next_attempt_at",
                (claimer, now + lease_s, now, now, limit),
            ).fetchall()
        return deliveries_from_rows(rows)
