"""How long schema v4 (the typed edit input) takes to rewrite the rows of an older store.

``--jobs`` jobs are queued in a fresh store, their ``input`` is turned back into the fal
shape an older kontext-server wrote (a 1-reference max input, a short https URL) and the
schema set back to v3; then the store is opened again, which runs the migration, and that
open is timed. Prints one JSON object.

    .venv/bin/python benchmarks/migrate_inputs.py [--jobs 100000]
        [--store postgresql://.../scratch]   # default: a SQLite file in a temporary folder

With ``--store postgresql://...``, give an empty scratch database: its job tables are
emptied first.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kontext_server.domain.editing import EditInput
from kontext_server.domain.jobs import NewJob
from kontext_server.store import open_store

OLD_INPUT = json.dumps(
    {
        "prompt": "Put a donut next to the flour.",
        "image_url": "https://v3.fal.media/files/rabbit/rmgBxhwGYb2d3pl3x9sKf_output.png",
        "seed": None,
        "guidance_scale": 3.5,
        "sync_mode": False,
        "num_images": 1,
        "safety_tolerance": "2",
        "output_format": "jpeg",
        "aspect_ratio": None,
        "enhance_prompt": False,
    }
)
EDIT = EditInput(prompt="p", references=("https://example.com/a.png",))
TO_V3 = ("UPDATE jobs SET input = ?", "DELETE FROM schema_version WHERE version = 4")


def _raw(url: str, statements: tuple[str, ...], params: tuple[Any, ...]) -> None:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.execute(statements[0], params)
            for statement in statements[1:]:
                conn.execute(statement)
        return
    import psycopg

    with psycopg.connect(url, autocommit=False) as pg:
        pg.execute(statements[0].replace("?", "%s::jsonb"), params)
        for statement in statements[1:]:
            pg.execute(statement)


def run(url: str, jobs: int) -> dict[str, Any]:
    store = open_store(url)  # creates the tables of a new database
    if not url.startswith("sqlite:///"):
        _raw(url, ("DELETE FROM job_events", "DELETE FROM webhook_outbox", "DELETE FROM jobs"), ())
    try:
        for start in range(0, jobs, 1000):
            batch = [
                NewJob(id=str(uuid.uuid4()), endpoint="fal-ai/flux-pro/kontext/max", input=EDIT)
                for _ in range(min(1000, jobs - start))
            ]
            store.submit_many(batch)
    finally:
        store.close()
    _raw(url, TO_V3, (OLD_INPUT,))
    started = time.perf_counter()
    open_store(url).close()
    seconds = time.perf_counter() - started
    return {
        "benchmark": "migrate_inputs",
        "store": url.split(":", 1)[0],
        "jobs": jobs,
        "migration_s": round(seconds, 3),
        "rows_per_s": round(jobs / seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--store", default=None, help="default: SQLite in a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        url = args.store or f"sqlite:///{Path(folder) / 'jobs.db'}"
        print(json.dumps(run(url, args.jobs)))


if __name__ == "__main__":
    main()
