"""A smoke run of ``kontext-server bench-api`` with tiny counts, on SQLite and on PostgreSQL
(``--store``, the session's throwaway cluster): every figure is there and measured. Timing
is not asserted (the figures of a tiny run on a shared machine mean nothing); the real run
is ``make bench-api`` / docs/performance.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from contract.pg_cluster import PgCluster
from kontext_server.cli import app

TINY_RUN = [
    "bench-api",
    "--clients", "2",
    "--duration-s", "0.3",
    "--warmup-s", "0.1",
    "--pollers", "4",
    "--running-jobs", "2",
    "--queued-jobs", "50",
    "--queue-samples", "5",
    "--start-samples", "2",
    "--overhead-jobs", "2",
    "--image-side-px", "64",
]  # fmt: skip
TARGET_METRICS = {
    "submit_throughput_ratio",
    "status_p99_ms",
    "queue_position_p99_ms",
    "submit_to_running_p99_ms",
    "job_overhead_p50_ms",
}


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder: Path = tmp_path_factory.mktemp("bench-api")
    result = CliRunner().invoke(app, [*TINY_RUN, "--dir", str(folder)])
    assert result.exit_code == 0, result.output
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_every_target_has_a_measured_value_and_a_verdict(figures: dict[str, Any]) -> None:
    assert {target["metric"] for target in figures["targets"]} == TARGET_METRICS
    for target in figures["targets"]:
        assert isinstance(target["passed"], bool)
        assert target["measured"] == target["measured"]  # not NaN
    assert figures["all_targets_met"] == all(t["passed"] for t in figures["targets"])


def test_both_servers_answered_every_submit(figures: dict[str, Any]) -> None:
    throughput = figures["submit_throughput"]
    for app_name in ("kontext", "bare_fastapi"):
        assert throughput[app_name]["requests_per_s"] > 0
        assert throughput[app_name]["unexpected_statuses"] == 0
    assert throughput["ratio"] > 0


def test_status_pollers_saw_queued_and_running_requests(figures: dict[str, Any]) -> None:
    status = figures["status_latency"]["kontext"]
    assert status["p50_ms"] > 0
    assert status["p99_ms"] >= status["p50_ms"]
    assert status["unexpected_statuses"] == 0
    assert status["polled_running"] == 2
    assert status["polled_queued"] == 2


def test_queue_start_and_overhead_figures_are_measured(figures: dict[str, Any]) -> None:
    assert figures["queue_position"]["queued_jobs"] == 50
    assert figures["queue_position"]["worst_p99_ms"] > 0
    assert figures["queue_position"]["warmup"]["max_ms"] > 0  # reported apart, not dropped
    assert figures["submit_to_running"]["samples"] == 2
    assert figures["submit_to_running"]["from_created"]["p50_ms"] > 0
    assert figures["job_overhead"]["jobs"] == 2
    assert figures["job_overhead"]["p50_ms"] > 0


# --- PostgreSQL: a fresh database per phase on the given server -----------------------------------
@pytest.fixture(scope="module")
def pg_run(
    pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], PgCluster]:
    folder: Path = tmp_path_factory.mktemp("bench-api-pg")
    store = pg_cluster.dsn("postgres")
    result = CliRunner().invoke(app, [*TINY_RUN, "--dir", str(folder), "--store", store])
    assert result.exit_code == 0, result.output
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed, pg_cluster


def _bench_databases(cluster: PgCluster) -> list[str]:
    import psycopg

    with psycopg.connect(cluster.dsn("postgres")) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'bench%'")
        return [str(row[0]) for row in rows]


def test_postgres_run_measures_every_target(pg_run: tuple[dict[str, Any], PgCluster]) -> None:
    figures, _ = pg_run
    assert figures["environment"]["store"] == "postgresql"
    assert figures["environment"]["postgresql"]
    assert {target["metric"] for target in figures["targets"]} == TARGET_METRICS
    for target in figures["targets"]:
        assert target["measured"] == target["measured"], target  # not NaN


def test_postgres_run_answered_submits_and_polls(pg_run: tuple[dict[str, Any], PgCluster]) -> None:
    figures, _ = pg_run
    kontext = figures["submit_throughput"]["kontext"]
    assert kontext["requests_per_s"] > 0
    assert kontext["unexpected_statuses"] == 0
    status = figures["status_latency"]["kontext"]
    assert status["unexpected_statuses"] == 0
    assert (status["polled_running"], status["polled_queued"]) == (2, 2)


def test_postgres_phases_use_their_own_databases(pg_run: tuple[dict[str, Any], PgCluster]) -> None:
    figures, cluster = pg_run
    # The overhead phase claims the oldest queued job: in the API phase's database that
    # would be one of its leftover submits, and the overhead jobs would not all succeed.
    assert figures["queue_position"]["queued_jobs"] == 50
    assert figures["queue_position"]["queue_depth"]["p50_ms"] > 0
    assert figures["submit_to_running"]["samples"] == 2
    assert figures["job_overhead"]["jobs"] == 2
    assert _bench_databases(cluster) == []  # every phase's database was dropped


# --- both stores in one run, side by side ---------------------------------------------------------
def test_one_run_reports_each_store_side_by_side_with_the_load(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    stores = ["--store", "sqlite", "--store", pg_cluster.dsn("postgres")]
    result = CliRunner().invoke(app, [*TINY_RUN, "--dir", str(tmp_path), *stores])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)

    assert set(figures["stores"]) == {"sqlite", "postgresql"}
    for name, run in figures["stores"].items():
        assert run["environment"]["store"] == name
        assert {"load_average_1m", "load_average_1m_at_end"} <= set(run["environment"])
    assert {row["metric"] for row in figures["side_by_side"]} == TARGET_METRICS
    for row in figures["side_by_side"]:
        for name in ("sqlite", "postgresql"):
            assert isinstance(row[name]["passed"], bool)
    assert {"load_average_1m", "load_average_1m_at_end"} <= set(figures["environment"])
    assert figures["all_targets_met"] == all(
        r["all_targets_met"] for r in figures["stores"].values()
    )
