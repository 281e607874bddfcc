"""The PostgreSQL schema of the job store, as numbered migrations applied on start.

The same tables, columns, versions and state machine as ``sqlite_schema.py``; only the
dialect differs: ``bigserial`` keys, ``double precision`` times (unix seconds, so both
stores and the fake clocks of the tests agree), ``jsonb`` payloads, ``boolean`` flags.

Differences on purpose:

* No ``queue_counts`` table. In SQLite writers are serialized anyway; in PostgreSQL a
  counter row would make every submit and claim queue on one row lock. A queue position is
  one range count on the partial queue index ``(priority, seq)`` (an index-only scan; see
  ``benchmarks/queue_position.py`` for its cost at 100k queued).
* Migrations run under an advisory lock (``MIGRATION_LOCK_ID``) in one transaction, so
  several processes starting at once apply each migration exactly once.

To change the schema, append a migration here and in ``sqlite_schema.py``.
"""

from __future__ import annotations

from kontext_server.store.inputs import InputsUpgrade, Migration

__all__ = ["MIGRATIONS", "MIGRATION_LOCK_ID", "NOTIFY_CHANNEL", "SCHEMA_VERSION"]

MIGRATION_LOCK_ID = 0x6B6F6E74  # "kont": any constant shared by every kontext-server process
NOTIFY_CHANNEL = "kontext_jobs"  # submit and requeue notify; waiting workers LISTEN

_V1: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        seq               bigserial PRIMARY KEY,
        id                text NOT NULL UNIQUE,
        owner             text,
        endpoint          text NOT NULL,
        priority          integer NOT NULL DEFAULT 0,
        status            text NOT NULL CHECK (
                              status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')
                          ),
        cancel_requested  boolean NOT NULL DEFAULT false,
        attempts          integer NOT NULL DEFAULT 0,
        max_attempts      integer NOT NULL CHECK (max_attempts >= 1),
        lease_owner       text,
        lease_until       double precision,
        input             jsonb NOT NULL,
        result            jsonb,
        error             text,
        error_type        text,
        progress_step     integer,
        progress_total    integer,
        start_deadline_at double precision,
        webhook_url       text,
        base_url          text,
        idempotency_key   text,
        created_at        double precision NOT NULL,
        started_at        double precision,
        finished_at       double precision
    )
    """,
    "CREATE INDEX jobs_queue ON jobs (priority, seq) WHERE status = 'queued'",
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
        id      bigserial PRIMARY KEY,
        job_id  text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        at      double precision NOT NULL,
        level   text NOT NULL,
        message text NOT NULL,
        data    jsonb NOT NULL DEFAULT '{}'
    )
    """,
    "CREATE INDEX job_events_by_job ON job_events (job_id, id)",
    """
    CREATE TABLE webhook_outbox (
        id              bigserial PRIMARY KEY,
        job_id          text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        url             text NOT NULL,
        attempts        integer NOT NULL DEFAULT 0,
        next_attempt_at double precision NOT NULL,
        claimed_by      text,
        claimed_until   double precision,
        delivered_at    double precision,
        last_error      text,
        gave_up_at      double precision,
        created_at      double precision NOT NULL
    )
    """,
    """
    CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL
    """,
    """
    CREATE TABLE api_keys (
        id         text PRIMARY KEY,
        name       text NOT NULL,
        key_hash   text NOT NULL UNIQUE,
        created_at double precision NOT NULL,
        revoked_at double precision
    )
    """,
)

_V2: tuple[str, ...] = (
    "ALTER TABLE jobs ADD COLUMN retention_s double precision",
    "ALTER TABLE jobs ADD COLUMN expires_at double precision",
    "UPDATE jobs SET expires_at = finished_at + 2592000 WHERE finished_at IS NOT NULL",
    "CREATE INDEX jobs_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL",
    "CREATE INDEX jobs_queued_by_owner ON jobs (owner) WHERE status = 'queued'",
    """
    CREATE INDEX jobs_active ON jobs (endpoint, priority, status)
    WHERE status IN ('queued', 'running')
    """,
    "CREATE INDEX webhook_outbox_by_job ON webhook_outbox (job_id)",
)

# v3: engines (docs/bfl-engine.md): one queue line per engine (claims and queue positions
# look at their engine only) and what an upstream engine recorded to resume its tasks.
_V3: tuple[str, ...] = (
    "ALTER TABLE jobs ADD COLUMN engine text NOT NULL DEFAULT 'local'",
    "ALTER TABLE jobs ADD COLUMN upstream jsonb",
    "DROP INDEX jobs_queue",
    "CREATE INDEX jobs_queue ON jobs (engine, priority, seq) WHERE status = 'queued'",
)

# v4: the typed edit input (store/inputs.py): old rows' fal-shaped input rewritten.
_V4: tuple[Migration, ...] = (
    InputsUpgrade(
        select_old="SELECT seq, input::text AS input FROM jobs WHERE seq > %s"
        " AND input -> 'v' IS NULL ORDER BY seq LIMIT %s",
        update="UPDATE jobs SET input = u.input::jsonb"
        " FROM unnest(%s::text[], %s::bigint[]) AS u(input, seq) WHERE jobs.seq = u.seq",
        batched=True,
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
