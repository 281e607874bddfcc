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

import json
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
    ApiKey,
    CancelOutcome,
    Job,
    JobEvent,
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
    KeysPresence,
    check_retention_s,
    file_keys_of,
    final_event,
    finish_error,
)
from kontext_server.store.queue_ranks import QueueRanks
from kontext_server.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION

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
_FENCE = "id = ? AND status = 'running' AND lease_owner = ? AND attempts = ?"


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


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _loads_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _job_from_row(row: sqlite3.Row) -> Job:
    step, total = row["progress_step"], row["progress_total"]
    return Job(
        id=row["id"],
        seq=row["seq"],
        endpoint=row["endpoint"],
        input=json.loads(row["input"]),
        owner=row["owner"],
        priority=row["priority"],
        status=JobStatus(row["status"]),
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        cancel_requested=bool(row["cancel_requested"]),
        lease_owner=row["lease_owner"],
        lease_until=row["lease_until"],
        result=_loads_or_none(row["result"]),
        error=row["error"],
        error_type=row["error_type"],
        progress=None if step is None or total is None else Progress(step=step, total=total),
        start_deadline_at=row["start_deadline_at"],
        webhook_url=row["webhook_url"],
        base_url=row["base_url"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        engine=row["engine"],
        upstream=_loads_or_none(row["upstream"]),
    )


def _new_job_row(job: NewJob, seq: int, created_at: float) -> Job:
    """The row ``submit`` just inserted, without reading it back."""
    return Job(
        id=job.id,
        seq=seq,
        endpoint=job.endpoint,
        input=job.input,
        owner=job.owner,
        priority=job.priority,
        status=JobStatus.QUEUED,
        attempts=0,
        max_attempts=job.max_attempts,
        cancel_requested=False,
        lease_owner=None,
        lease_until=None,
        result=None,
        error=None,
        error_type=None,
        progress=None,
        start_deadline_at=job.start_deadline_at,
        webhook_url=job.webhook_url,
        base_url=job.base_url,
        created_at=created_at,
        engine=job.engine,
    )


def _event_from_row(row: sqlite3.Row) -> JobEvent:
    return JobEvent(
        id=row["id"],
        job_id=row["job_id"],
        at=row["at"],
        level=row["level"],
        message=row["message"],
        data=json.loads(row["data"]),
    )


def _api_key_from_row(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        id=row["id"], name=row["name"], created_at=row["created_at"], revoked_at=row["revoked_at"]
    )


class SQLiteJobStore:
    """The ``JobStore`` protocol on one SQLite file. Thread-safe and multi-process safe.

    ``path`` is a file path; ``":memory:"`` gives a private temporary file removed on
    ``close()`` (a real in-memory database would be private to one connection, and this
    store uses one connection per thread). ``clock`` returns unix seconds; tests inject a
    fake one. ``default_retention_s`` is how long a finished job is kept when its
    ``NewJob.retention_s`` is ``None``.
    """

    waits_on_network = False  # a local file: calls stay on the API's event loop

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        default_retention_s: float = DEFAULT_RETENTION_S,
        work_poll_s: float = WORK_POLL_INTERVAL_S,
    ):
        self._clock = clock
        self._work_poll_s = work_poll_s
        self._default_retention_s = check_retention_s(default_retention_s, "default_retention_s")
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
        self._keys_presence = KeysPresence()
        self._ranks = QueueRanks(self._queued_lines)
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

    def _migrate(self) -> None:
        with self._write() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version"
                " (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            current = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version")
            version: int = current.fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the job store {self._path} has schema version {version}, newer than this"
                    f" kontext-server knows ({SCHEMA_VERSION}): upgrade kontext-server"
                )
            for number, statements in MIGRATIONS:
                if number > version:
                    for statement in statements:
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                        (number, self._clock()),
                    )

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
        for one in done:
            if one.created:
                self._ranks.note_queued(one.job.engine, one.job.priority, one.job.seq)
        if any(one.created for one in done):
            self._signal_work()
        return done

    def _submit_one(self, conn: sqlite3.Connection, job: NewJob) -> Submitted:
        if job.idempotency_key is not None:
            existing = conn.execute(
                "SELECT * FROM jobs WHERE coalesce(owner, '') = ? AND idempotency_key = ?",
                (job.owner or "", job.idempotency_key),
            ).fetchone()
            if existing is not None:
                found = _job_from_row(existing)
                return Submitted(found, False, self._position_in(conn, found.id))
        now = self._clock()
        try:
            (seq,) = conn.execute(
                "INSERT INTO jobs (id, owner, endpoint, priority, status, max_attempts,"
                " input, start_deadline_at, webhook_url, base_url, idempotency_key,"
                " retention_s, created_at, engine)"
                " VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                (
                    job.id,
                    job.owner,
                    job.endpoint,
                    job.priority,
                    job.max_attempts,
                    _dumps(job.input),
                    job.start_deadline_at,
                    job.webhook_url,
                    job.base_url,
                    job.idempotency_key,
                    job.retention_s,
                    now,
                    job.engine,
                ),
            ).fetchone()
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"cannot insert job {job.id!r}: {exc}") from exc
        # The newest job of its line: every other queued job of its engine at its priority or
        # a better one is ahead of it, and queue_counts (kept by triggers) has them all.
        (ahead,) = conn.execute(
            "SELECT coalesce(sum(queued), 0) - 1 FROM queue_counts"
            " WHERE engine = ? AND priority <= ?",
            (job.engine, job.priority),
        ).fetchone()
        return Submitted(_new_job_row(job, seq, now), True, int(ahead))

    def _position_in(self, conn: sqlite3.Connection, job_id: str) -> int:
        row = conn.execute(_QUEUE_POSITION_SQL, (job_id,)).fetchone()
        return 0 if row is None else int(row[0])

    def get(self, job_id: str) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job_from_row(row)

    def queue_position(self, job_id: str) -> int | None:
        """Queued jobs of the same engine ahead by (priority, seq), from ``QueueRanks``: one
        read of the job, then binary searches in memory, whatever the depth. Exact for this
        process's own changes; other processes' are seen within ``QueueRanks.max_age_s`` (1 s) plus
        one reload (``queue_ranks.py``)."""
        row = (
            self._conn()
            .execute("SELECT status, engine, priority, seq FROM jobs WHERE id = ?", (job_id,))
            .fetchone()
        )
        if row is None or row["status"] != JobStatus.QUEUED.value:
            return None
        return self._ranks.position(row["engine"], row["priority"], row["seq"])

    def queue_position_of(self, job: Job) -> int | None:
        if job.status is not JobStatus.QUEUED:
            return None
        return self._ranks.position(job.engine, job.priority, job.seq)

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
        return [
            QueueDepth(
                endpoint=row["endpoint"],
                priority=row["priority"],
                queued=int(row["queued"]),
                running=int(row["running"]),
            )
            for row in rows
        ]

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
            conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
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

    def events(self, job_id: str, after_id: int = 0, limit: int = 1000) -> list[JobEvent]:
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM job_events WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?",
                (job_id, after_id, limit),
            )
            .fetchall()
        )
        return [_event_from_row(row) for row in rows]

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
            job = _job_from_row(row)
            self._moved(False, [row])
            self._insert_event(conn, job.id, now, "INFO", f"started (attempt {job.attempts})")
        return job

    def peek_queued(self, limit: int, *, engine: str = "local") -> list[Job]:
        """The next ``limit`` jobs ``claim`` would take, in its order; a plain read (no write
        lock, nothing changes). Jobs past their start deadline are left out: ``claim`` fails
        them instead of starting them."""
        if limit <= 0 or not self._anything_queued(engine):
            return []
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM jobs WHERE status = 'queued' AND engine = ?"
                " AND (start_deadline_at IS NULL OR start_deadline_at >= ?)"
                " ORDER BY priority, seq LIMIT ?",
                (engine, self._clock(), limit),
            )
            .fetchall()
        )
        return [_job_from_row(row) for row in rows]

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
                f" finished_at = ?, lease_until = NULL WHERE {_FENCE} AND cancel_requested = 1"
                " RETURNING id, webhook_url",
                (CANCELLED_ERROR, CANCELLED_ERROR_TYPE, now, job_id, worker_id, attempt),
            ).fetchall()
            self._close_jobs(conn, canceled, now, "WARN", "canceled")
            if canceled:
                return True
            released = conn.execute(
                "UPDATE jobs SET status = 'queued', attempts = attempts - 1, lease_owner = NULL,"
                " lease_until = NULL, started_at = NULL, progress_step = NULL,"
                f" progress_total = NULL WHERE {_FENCE} RETURNING engine, priority, seq",
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
                f"UPDATE jobs SET lease_until = ? WHERE {_FENCE}",
                (self._clock() + lease_s, job_id, worker_id, attempt),
            )
        return cursor.rowcount == 1

    def set_upstream(
        self, job_id: str, worker_id: str, attempt: int, upstream: dict[str, Any]
    ) -> bool:
        """Fenced: replace the job's ``upstream`` record (kept across attempts)."""
        cursor = self._conn().execute(
            f"UPDATE jobs SET upstream = ? WHERE {_FENCE}",
            (_dumps(upstream), job_id, worker_id, attempt),
        )
        return cursor.rowcount == 1

    def is_cancel_requested(self, job_id: str) -> bool:
        row = (
            self._conn()
            .execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
            .fetchone()
        )
        return row is not None and bool(row[0])

    def set_progress(self, job_id: str, worker_id: str, attempt: int, progress: Progress) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                f"UPDATE jobs SET progress_step = ?, progress_total = ? WHERE {_FENCE}",
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
                f" finished_at = ?, lease_until = NULL WHERE {_FENCE} RETURNING id, webhook_url",
                (
                    status.value,
                    None if result is None else _dumps(result),
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
        return [
            PurgedJob(id=row["id"], file_keys=file_keys_of(_loads_or_none(row["result"])))
            for row in rows
        ]

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
            (job_id, at, level, message, _dumps(data or {})),
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
        deliveries = [
            WebhookDelivery(
                id=row["id"],
                job_id=row["job_id"],
                url=row["url"],
                attempts=row["attempts"],
                next_attempt_at=row["next_attempt_at"],
            )
            for row in rows
        ]
        return sorted(deliveries, key=lambda d: (d.next_attempt_at, d.id))

    def webhook_delivered(self, delivery_id: int) -> None:
        self._conn().execute(
            "UPDATE webhook_outbox SET delivered_at = ?, attempts = attempts + 1,"
            " claimed_by = NULL, claimed_until = NULL WHERE id = ?",
            (self._clock(), delivery_id),
        )

    def webhook_retry(self, delivery_id: int, next_attempt_at: float, error: str) -> None:
        """A failed attempt: ``attempts + 1``, due again at ``next_attempt_at``, claim released."""
        self._conn().execute(
            "UPDATE webhook_outbox SET attempts = attempts + 1, next_attempt_at = ?,"
            " last_error = ?, claimed_by = NULL, claimed_until = NULL WHERE id = ?",
            (next_attempt_at, error, delivery_id),
        )

    def webhook_give_up(self, delivery_id: int, error: str) -> None:
        """The last failed attempt: ``attempts + 1``; the row is never due again."""
        self._conn().execute(
            "UPDATE webhook_outbox SET attempts = attempts + 1, gave_up_at = ?, last_error = ?,"
            " claimed_by = NULL, claimed_until = NULL WHERE id = ?",
            (self._clock(), error, delivery_id),
        )

    # --- API keys ---------------------------------------------------------------------------------
    def create_api_key(self, key_id: str, name: str, key_hash: str) -> ApiKey:
        """Store a key by its hash (the caller hashes). ``StoreError`` if id or hash exists."""
        try:
            row = (
                self._conn()
                .execute(
                    "INSERT INTO api_keys (id, name, key_hash, created_at) VALUES (?, ?, ?, ?)"
                    " RETURNING *",
                    (key_id, name, key_hash, self._clock()),
                )
                .fetchone()
            )
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"cannot create API key {key_id!r}: {exc}") from exc
        self._keys_presence.forget()
        return _api_key_from_row(row)

    def find_api_key(self, key_hash: str) -> ApiKey | None:
        row = (
            self._conn()
            .execute(
                "SELECT * FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,)
            )
            .fetchone()
        )
        return None if row is None else _api_key_from_row(row)

    def list_api_keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        rows = self._conn().execute("SELECT * FROM api_keys ORDER BY created_at, id").fetchall()
        return [_api_key_from_row(row) for row in rows]

    def revoke_api_key(self, key_id: str) -> bool:
        """``True`` if an active key with this id was revoked now; ``False`` if there is no
        such key or it was already revoked."""
        cursor = self._conn().execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (self._clock(), key_id),
        )
        self._keys_presence.forget()
        return cursor.rowcount == 1

    def known_has_api_keys(self) -> bool | None:
        """``has_api_keys``' cached answer, or ``None`` when it would ask the database."""
        return self._keys_presence.known()

    def has_api_keys(self) -> bool:
        """Cached for ``API_KEYS_CACHE_S`` (``common.KeysPresence``)."""
        return self._keys_presence.answer(self._any_active_key)

    def _any_active_key(self) -> bool:
        row = (
            self._conn()
            .execute("SELECT EXISTS (SELECT 1 FROM api_keys WHERE revoked_at IS NULL)")
            .fetchone()
        )
        return bool(row[0])
