"""``SqlJobStore``: the ``JobStore`` methods that SQLite and PostgreSQL run alike.

A method lives here when its logic is the same on both backends: one shared statement
(``statements.py``), one round trip, one row mapper (``rows.py``); so do the state both
keep (clock, retention default, ``KeysPresence``, ``QueueRanks``) and the migration loop.
A backend supplies its dialect: ``_sql`` (the shared statements in its placeholder style),
``_json`` (how it sends a JSON value), ``_list_api_keys_sql``, ``_insert_api_key``,
``_queued_lines``, and three ways to run one statement on its connections (``_fetchone``,
``_fetchall``, ``_rowcount``). Whatever holds locks, spans transactions or needs statements
of its own stays in the backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from array import array
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from kontext_server.domain.errors import StoreError
from kontext_server.domain.jobs import ApiKey, Job, JobEvent, JobStatus, Submitted
from kontext_server.store.common import KeysPresence, check_retention_s
from kontext_server.store.inputs import Migration
from kontext_server.store.queue_ranks import QueueRanks
from kontext_server.store.rows import Row, api_key_from_row, event_from_row, job_from_row
from kontext_server.store.statements import Statements

__all__ = ["SqlJobStore"]


class SqlJobStore(ABC):
    """The shared half of ``SQLiteJobStore`` and ``PostgresJobStore`` (see the module)."""

    _sql: ClassVar[Statements]
    _list_api_keys_sql: ClassVar[str]  # every key, oldest first, in the dialect's collation

    def __init__(self, *, clock: Callable[[], float], default_retention_s: float) -> None:
        self._clock = clock
        self._default_retention_s = check_retention_s(default_retention_s, "default_retention_s")
        self._keys_presence = KeysPresence()
        self._ranks = QueueRanks(self._queued_lines)

    # --- the dialect ------------------------------------------------------------------------------
    @abstractmethod
    def _fetchone(self, sql: str, params: Any = None) -> Row | None: ...

    @abstractmethod
    def _fetchall(self, sql: str, params: Any = None) -> Sequence[Row]: ...

    @abstractmethod
    def _rowcount(self, sql: str, params: Any = None) -> int: ...

    @staticmethod
    @abstractmethod
    def _json(value: Any) -> Any:
        """``value`` as the driver's parameter for a JSON column."""

    @abstractmethod
    def _queued_lines(self) -> list[tuple[str, int, array[int]]]:
        """Every queued job's seq, by (engine, priority) line: ``QueueRanks``' loader."""

    @abstractmethod
    def _insert_api_key(self, params: tuple[str, str, str, float]) -> Row:
        """Runs ``insert_api_key``; ``StoreError`` when the id or the hash exists."""

    def _apply_migrations(
        self,
        execute: Callable[..., Any],
        store: str,
        known: int,
        migrations: Sequence[tuple[int, Sequence[Migration]]],
    ) -> None:
        """Inside the caller's migration transaction (``execute``: its connection's), after
        ``schema_version`` exists: the migrations newer than the stored version, each
        recorded; ``StoreError`` if the database is newer than ``known``."""
        row = execute(self._sql.schema_version).fetchone()
        version = 0 if row is None else int(row["version"])
        if version > known:
            raise StoreError(
                f"the job store {store} has schema version {version}, newer than this"
                f" kontext-server knows ({known}): upgrade kontext-server"
            )
        for number, statements in migrations:
            if number > version:
                for step in statements:
                    if isinstance(step, str):
                        execute(step)
                    else:
                        step(execute)
                execute(self._sql.insert_schema_version, (number, self._clock()))

    def _note_submitted(self, done: Sequence[Submitted]) -> None:
        """Committed: the created jobs of ``done`` joined the queue."""
        for one in done:
            if one.created:
                self._ranks.note_queued(one.job.engine, one.job.priority, one.job.seq)

    # --- API side ---------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        row = self._fetchone(self._sql.job_by_id, (job_id,))
        return None if row is None else job_from_row(row)

    def queue_position(self, job_id: str) -> int | None:
        """Queued jobs of the same engine ahead by (priority, seq), from ``QueueRanks``: one
        read of the job, then binary searches in memory, whatever the depth. Exact for this
        process's own changes; other processes' are seen within ``QueueRanks.max_age_s`` (1 s) plus
        one reload (``queue_ranks.py``)."""
        row = self._fetchone(self._sql.job_place_by_id, (job_id,))
        if row is None or row["status"] != JobStatus.QUEUED.value:
            return None
        return self._ranks.position(row["engine"], row["priority"], row["seq"])

    def queue_position_of(self, job: Job) -> int | None:
        if job.status is not JobStatus.QUEUED:
            return None
        return self._ranks.position(job.engine, job.priority, job.seq)

    def events(self, job_id: str, after_id: int = 0, limit: int = 1000) -> list[JobEvent]:
        rows = self._fetchall(self._sql.events_after, (job_id, after_id, limit))
        return [event_from_row(row) for row in rows]

    # --- worker side ------------------------------------------------------------------------------
    def set_upstream(
        self, job_id: str, worker_id: str, attempt: int, upstream: dict[str, Any]
    ) -> bool:
        """Fenced: replace the job's ``upstream`` record (kept across attempts)."""
        params = (self._json(upstream), job_id, worker_id, attempt)
        return self._rowcount(self._sql.set_upstream, params) == 1

    def is_cancel_requested(self, job_id: str) -> bool:
        row = self._fetchone(self._sql.cancel_requested, (job_id,))
        return row is not None and bool(row["cancel_requested"])

    # --- webhook outbox ---------------------------------------------------------------------------
    def webhook_delivered(self, delivery_id: int) -> None:
        self._rowcount(self._sql.webhook_delivered, (self._clock(), delivery_id))

    def webhook_retry(self, delivery_id: int, next_attempt_at: float, error: str) -> None:
        """A failed attempt: ``attempts + 1``, due again at ``next_attempt_at``, claim released."""
        self._rowcount(self._sql.webhook_retry, (next_attempt_at, error, delivery_id))

    def webhook_give_up(self, delivery_id: int, error: str) -> None:
        """The last failed attempt: ``attempts + 1``; the row is never due again."""
        self._rowcount(self._sql.webhook_give_up, (self._clock(), error, delivery_id))

    # --- API keys ---------------------------------------------------------------------------------
    def create_api_key(self, key_id: str, name: str, key_hash: str) -> ApiKey:
        """Store a key by its hash (the caller hashes). ``StoreError`` if id or hash exists."""
        row = self._insert_api_key((key_id, name, key_hash, self._clock()))
        self._keys_presence.forget()
        return api_key_from_row(row)

    def find_api_key(self, key_hash: str) -> ApiKey | None:
        row = self._fetchone(self._sql.active_api_key, (key_hash,))
        return None if row is None else api_key_from_row(row)

    def list_api_keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        return [api_key_from_row(row) for row in self._fetchall(self._list_api_keys_sql)]

    def revoke_api_key(self, key_id: str) -> bool:
        """``True`` if an active key with this id was revoked now; ``False`` if there is no
        such key or it was already revoked."""
        revoked = self._rowcount(self._sql.revoke_api_key, (self._clock(), key_id))
        self._keys_presence.forget()
        return revoked == 1

    def known_has_api_keys(self) -> bool | None:
        """``has_api_keys``' cached answer, or ``None`` when it would ask the database."""
        return self._keys_presence.known()

    def has_api_keys(self) -> bool:
        """Cached for ``API_KEYS_CACHE_S`` (``common.KeysPresence``): authentication asks on
        every request, and each answer would be a read (on PostgreSQL a round trip)."""
        return self._keys_presence.answer(self._any_active_key)

    def _any_active_key(self) -> bool:
        row = self._fetchone(self._sql.any_active_api_key)
        return row is not None and bool(row["any"])
