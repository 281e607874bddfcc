"""Schema v4 on both stores: rows written before the typed input (a fal-shaped ``input``) are
read as the worker read them, and rewritten by the migration when a store opens."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kontext_server.domain.editing import EDIT_INPUT_VERSION, EditInput
from kontext_server.domain.jobs import NewJob
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


def _make_old(backend: Backend, url: str, job_id: str) -> None:
    """The job's row as an older kontext-server wrote it, in a store at schema v3."""
    _raw(
        backend, url, "UPDATE jobs SET input = ? WHERE id = ?", (json.dumps(OLD_BFL_INPUT), job_id)
    )
    _raw(backend, url, "DELETE FROM schema_version WHERE version = 4")


def _stored(backend: Backend, url: str, job_id: str) -> dict[str, Any]:
    (value,) = _raw(backend, url, "SELECT input FROM jobs WHERE id = ?", (job_id,))[0]
    return value if isinstance(value, dict) else json.loads(value)


def test_an_old_row_is_read_as_before_and_rewritten_when_the_store_opens(
    backend: Backend,
    store_url: str,
    open_store: Callable[[], JobStore],
    make_job: Callable[..., NewJob],
) -> None:
    store = open_store()
    old, new = (store.submit_many([make_job()])[0].job for _ in range(2))
    _make_old(backend, store_url, old.id)

    read = store.get(old.id)  # a process that opened the store before: still readable
    assert read is not None and read.input == AS_EDIT
    assert (read.api, read.api_data) == ("bfl", {"webhook_secret": "shh"})

    reopened = open_store()  # the migration rewrites the old row, and only it
    stored = _stored(backend, store_url, old.id)
    assert stored["v"] == EDIT_INPUT_VERSION and "image_urls" not in stored
    assert _stored(backend, store_url, new.id) == new.input.to_record()
    again = reopened.get(old.id)
    assert again is not None and again.input == AS_EDIT
    assert (again.api, again.api_data) == ("bfl", {"webhook_secret": "shh"})
    versions = _raw(backend, store_url, "SELECT version FROM schema_version ORDER BY version")
    assert [version for (version,) in versions][-1] == 4
