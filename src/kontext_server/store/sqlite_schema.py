"""The SQLite schema of the job store, as numbered migrations applied on open.

The PostgreSQL store of a later issue shares the tables, columns and state machine; only
the dialect differs (``INTEGER PRIMARY KEY AUTOINCREMENT`` -> ``bigserial``, ``REAL`` ->
``double precision``). To change the schema, append a migration; never edit an applied one.

Notes on choices:

* ``seq`` is the rowid (``INTEGER PRIMARY KEY AUTOINCREMENT``): monotonic, never reused, and
  the cheapest key SQLite has; the public ``id`` (a uuid) is ``UNIQUE``.
* Idempotency keys are unique per owner, where a missing owner (authentication off) counts
  as one owner: SQLite treats NULLs as distinct in ``UNIQUE``, hence ``coalesce``.
* Partial indexes keep the hot paths small: the queue (``priority, seq``) only holds queued
  jobs, the lease index only running ones.
* ``queue_counts`` (queued jobs per priority) is maintained by triggers. Counting index
  entries is linear (~40 ns each); with the counts, a queue position scans at most half of
  its priority's line, and the queue depth costs nothing.
* Retention (v2): ``retention_s`` is the job's own (``NULL``: the store's default);
  ``expires_at`` is set when the job reaches a final status (``finished_at`` + retention),
  so the purge walks a small index instead of computing per row.
"""

from __future__ import annotations

from kontext_server.store.inputs import InputsUpgrade, Migration

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

_V1: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        seq               INTEGER PRIMARY KEY AUTOINCREMENT,
        id                TEXT NOT NULL UNIQUE,
        owner             TEXT,
        endpoint          TEXT NOT NULL,
        priority          INTEGER NOT NULL DEFAULT 0,
        status            TEXT NOT NULL CHECK (
                              status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')
                          ),
        cancel_requested  INTEGER NOT NULL DEFAULT 0,
        attempts          INTEGER NOT NULL DEFAULT 0,
        max_attempts      INTEGER NOT NULL CHECK (max_attempts >= 1),
        lease_owner       TEXT,
        lease_until       REAL,
        input             TEXT NOT NULL,
        result            TEXT,
        error             TEXT,
        error_type        TEXT,
        progress_step     INTEGER,
        progress_total    INTEGER,
        start_deadline_at REAL,
        webhook_url       TEXT,
        base_url          TEXT,
        idempotency_key   TEXT,
        created_at        REAL NOT NULL,
        started_at        REAL,
        finished_at       REAL
    )
    """,
    "CREATE INDEX jobs_queue ON jobs (priority, seq) WHERE status = 'queued'",
    # Queued jobs per priority, kept by triggers (so no write path can forget it): queue
    # depth in O(1), and queue positions count from whichever end of the line is nearer.
    """
    CREATE TABLE queue_counts (
        priority INTEGER PRIMARY KEY,
        queued   INTEGER NOT NULL CHECK (queued >= 0)
    )
    """,
    """
    CREATE TRIGGER queue_counts_insert AFTER INSERT ON jobs WHEN NEW.status = 'queued'
    BEGIN
        INSERT INTO queue_counts (priority, queued) VALUES (NEW.priority, 1)
        ON CONFLICT (priority) DO UPDATE SET queued = queued + 1;
    END
    """,
    """
    CREATE TRIGGER queue_counts_leave AFTER UPDATE OF status, priority ON jobs
    WHEN OLD.status = 'queued'
    BEGIN
        UPDATE queue_counts SET queued = queued - 1 WHERE priority = OLD.priority;
    END
    """,
    """
    CREATE TRIGGER queue_counts_enter AFTER UPDATE OF status, priority ON jobs
    WHEN NEW.status = 'queued'
    BEGIN
        INSERT INTO queue_counts (priority, queued) VALUES (NEW.priority, 1)
        ON CONFLICT (priority) DO UPDATE SET queued = queued + 1;
    END
    """,
    """
    CREATE TRIGGER queue_counts_delete AFTER DELETE ON jobs WHEN OLD.status = 'queued'
    BEGIN
        UPDATE queue_counts SET queued = queued - 1 WHERE priority = OLD.priority;
    END
    """,
    "CREATE INDEX jobs_leases ON jobs (lease_until) WHERE status = 'running'",
    """
    CREATE INDEX jobs_start_deadlines ON jobs (start_deadline_at)
    WHERE status = 'queued' AND start_deadline_at IS NOT NULL
    """,
    """
    CREATE UNIQUE INDEX jobs_idempotency ON jobs (coalesce(owner, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL
    """,
    """
    CREATE TABLE job_events (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id  TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        at      REAL NOT NULL,
        level   TEXT NOT NULL,
        message TEXT NOT NULL,
        data    TEXT NOT NULL DEFAULT '{}'
    )
    """,
    "CREATE INDEX job_events_by_job ON job_events (job_id, id)",
    """
    CREATE TABLE webhook_outbox (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id          TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        url             TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        claimed_by      TEXT,
        claimed_until   REAL,
        delivered_at    REAL,
        last_error      TEXT,
        gave_up_at      REAL,
        created_at      REAL NOT NULL
    )
    """,
    """
    CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL
    """,
    """
    CREATE TABLE api_keys (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL,
        key_hash   TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        revoked_at REAL
    )
    """,
)

_V2: tuple[str, ...] = (
    "ALTER TABLE jobs ADD COLUMN retention_s REAL",
    "ALTER TABLE jobs ADD COLUMN expires_at REAL",
    # Jobs finished before v2 get the documented default (a store's own default is not
    # known to a migration).
    "UPDATE jobs SET expires_at = finished_at + 2592000 WHERE finished_at IS NOT NULL",
    "CREATE INDEX jobs_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL",
    # Per-key limits count one owner's queued jobs.
    "CREATE INDEX jobs_queued_by_owner ON jobs (owner) WHERE status = 'queued'",
    # Metrics group the active jobs by (endpoint, priority).
    """
    CREATE INDEX jobs_active ON jobs (endpoint, priority, status)
    WHERE status IN ('queued', 'running')
    """,
    # Purging a job deletes its outbox rows (ON DELETE CASCADE): find them by job.
    "CREATE INDEX webhook_outbox_by_job ON webhook_outbox (job_id)",
)

_QUEUE_COUNT_TRIGGERS = (
    "queue_counts_insert",
    "queue_counts_leave",
    "queue_counts_enter",
    "queue_counts_delete",
)

# v3: engines (docs/bfl-engine.md). Each engine has its own line: a worker claims only its
# engine's jobs, and a queue position counts only the jobs ahead in the same line (jobs of
# another engine are run by other workers and do not delay this one). ``upstream`` is what
# an upstream engine recorded (its task ids) so that a new attempt resumes them.
_V3: tuple[str, ...] = (
    "ALTER TABLE jobs ADD COLUMN engine TEXT NOT NULL DEFAULT 'local'",
    "ALTER TABLE jobs ADD COLUMN upstream TEXT",
    *(f"DROP TRIGGER {name}" for name in _QUEUE_COUNT_TRIGGERS),
    "DROP TABLE queue_counts",
    """
    CREATE TABLE queue_counts (
        engine   TEXT NOT NULL,
        priority INTEGER NOT NULL,
        queued   INTEGER NOT NULL CHECK (queued >= 0),
        PRIMARY KEY (engine, priority)
    )
    """,
    """
    INSERT INTO queue_counts (engine, priority, queued)
    SELECT engine, priority, count(*) FROM jobs WHERE status = 'queued'
    GROUP BY engine, priority
    """,
    """
    CREATE TRIGGER queue_counts_insert AFTER INSERT ON jobs WHEN NEW.status = 'queued'
    BEGIN
        INSERT INTO queue_counts (engine, priority, queued) VALUES (NEW.engine, NEW.priority, 1)
        ON CONFLICT (engine, priority) DO UPDATE SET queued = queued + 1;
    END
    """,
    """
    CREATE TRIGGER queue_counts_leave AFTER UPDATE OF status, priority, engine ON jobs
    WHEN OLD.status = 'queued'
    BEGIN
        UPDATE queue_counts SET queued = queued - 1
        WHERE engine = OLD.engine AND priority = OLD.priority;
    END
    """,
    """
    CREATE TRIGGER queue_counts_enter AFTER UPDATE OF status, priority, engine ON jobs
    WHEN NEW.status = 'queued'
    BEGIN
        INSERT INTO queue_counts (engine, priority, queued) VALUES (NEW.engine, NEW.priority, 1)
        ON CONFLICT (engine, priority) DO UPDATE SET queued = queued + 1;
    END
    """,
    """
    CREATE TRIGGER queue_counts_delete AFTER DELETE ON jobs WHEN OLD.status = 'queued'
    BEGIN
        UPDATE queue_counts SET queued = queued - 1
        WHERE engine = OLD.engine AND priority = OLD.priority;
    END
    """,
    "DROP INDEX jobs_queue",
    "CREATE INDEX jobs_queue ON jobs (engine, priority, seq) WHERE status = 'queued'",
)

# v4: the typed edit input (store/inputs.py): old rows' fal-shaped input rewritten.
_V4: tuple[Migration, ...] = (
    InputsUpgrade(
        select_old="SELECT seq, input FROM jobs WHERE seq > ? AND json_extract(input, '$.v')"
        " IS NULL ORDER BY seq LIMIT ?",
        update="UPDATE jobs SET input = ? WHERE seq = ?",
    ),
)

# (version, steps), in order. The version of the last entry is the current schema.
MIGRATIONS: tuple[tuple[int, tuple[Migration, ...]], ...] = (
    (1, _V1),
    (2, _V2),
    (3, _V3),
    (4, _V4),
)

SCHEMA_VERSION = MIGRATIONS[-1][0]
