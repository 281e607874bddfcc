"""Schema v4 on both stores: rows written before the typed input (a fal-shaped ``input``) are
read as the worker read them, and rewritten by the migration when a store opens."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from kontext_server.domain.editing import EDIT_INPUT_VERSION, EditInput
from kontext_server.domain.jobs import NewJob
from kontext_server.store import inputs
from kontext_server.store.base import JobStore

if TYPE_CHECKING:
    from tests.contract.conftest import Backend

OLD_BFL_INPUT = {
    "prompt": "add a hat",
    "image_urls": ["https://example.com/a.png", "https://example.com/b.png"],
    "seed": 11,
    "guidance_scale": 4.0,
    "sync_mode": True,
    "num_images": 2,
    "safety_tolerance": "5",
    "output_format": "png",
    "aspect_ratio": "16:9",
    "enhance_prompt": True,
    "bfl_api": {"webhook_secret": "shh"},
}
AS_EDIT = EditInput(
    prompt="add a hat",
    references=("https://example.com/a.png", "https://example.com/b.png"),
    seed=11,
    guidance_scale=4.0,
    num_images=2,
    aspect_ratio="16:9",
    output_format="png",
    inline_output=True,
    safety_tolerance=5,
    enhance_prompt=True,
)


def _raw(backend: Backend, url: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Runs one statement on the store's database outside the store; its rows."""
    if backend.name == "sqlite":
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            with conn:
                return conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(url, autocommit=True) as pg:
        cursor = pg.execute(sql.replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description else []


def _make_old(backend: Backend, url: str, *job_ids: str) -> None:
    """The jobs' rows as an older kontext-server wrote them, in a store at schema v3."""
    for job_id in job_ids:
        old = json.dumps(OLD_BFL_INPUT)
        _raw(backend, url, "UPDATE jobs SET input = ? WHERE id = ?", (old, job_id))
    _raw(backend, url, "DELETE FROM schema_version WHERE version = 4")


def _stored(backend: Backend, url: str, job_id: str) -> dict[str, Any]:
    (value,) = _raw(backend, url, "SELECT input FROM jobs WHERE id = ?", (job_id,))[0]
    return value if isinstance(value, dict) else json.loads(value)


def test_an_old_row_is_read_as_before_and_rewritten_when_the_store_opens(
    backend: Backend,
    store_url: str,
    open_store: Callable[[], JobStore],
    make_job: Callable[..., NewJob],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = open_store()
    jobs = [store.submit_many([make_job()])[0].job for _ in range(7)]
    old, new = jobs[::2], jobs[1::2]  # interleaved: batches skip the new rows
    _make_old(backend, store_url, *(job.id for job in old))

    read = store.get(old[0].id)  # a process that opened the store before: still readable
    assert read is not None and read.input == AS_EDIT
    assert (read.api, read.api_data) == ("bfl", {"webhook_secret": "shh"})

    monkeypatch.setattr(inputs, "UPGRADE_BATCH", 2)  # four old rows: two batches and more
    reopened = open_store()  # the migration rewrites the old rows, and only them
    for job in old:
        stored = _stored(backend, store_url, job.id)
        assert stored["v"] == EDIT_INPUT_VERSION and "image_urls" not in stored
        again = reopened.get(job.id)
        assert again is not None and again.input == AS_EDIT
        assert (again.api, again.api_data) == ("bfl", {"webhook_secret": "shh"})
    for job in new:
        assert _stored(backend, store_url, job.id) == job.input.to_record()
    versions = _raw(backend, store_url, "SELECT version FROM schema_version ORDER BY version")
    assert [version for (version,) in versions][-1] == 4
