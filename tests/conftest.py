"""Fixtures shared by every test folder.

``pg_cluster``: one throwaway PostgreSQL cluster per test session (``initdb`` + ``pg_ctl`` on
a private Unix socket, see ``tests/contract/pg_cluster.py``), started on first use and
stopped at the end of the session, also when tests fail. Tests that need PostgreSQL are
skipped, with the reason, only when no ``initdb`` can be found. Use
``pg_cluster.create_database(name)`` for a database of your own (about 40 ms), and
``pg_cluster.stop()`` / ``pg_cluster.start()`` for outage tests (start it again before the
test ends: the cluster is shared).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from contract.pg_cluster import PgCluster, find_pg_bin_dir

NO_POSTGRES = (
    "PostgreSQL tests need initdb and pg_ctl (on PATH or in /usr/lib/postgresql/*/bin):"
    " install the `postgresql` package (.ci/run does)"
)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    bin_dir = find_pg_bin_dir()
    if bin_dir is None:
        pytest.skip(NO_POSTGRES)
    cluster = PgCluster(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
