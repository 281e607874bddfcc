"""Request ids are RFC 9562 version 7 UUIDs: unique, in submit order (so each insert lands at
the end of the id index), with 76 random bits each."""

from __future__ import annotations

import uuid
from pathlib import Path

from kontext_server.config import Settings
from kontext_server.core.service import QueueService
from kontext_server.domain.editing import EditInput
from kontext_server.store.sqlite import SQLiteJobStore

ENDPOINT = "fal-ai/flux-pro/kontext/max"
INPUT = EditInput(prompt="make it blue", references=("https://example.com/in.png",))


def test_request_ids_are_version_7_uuids_in_submit_order(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.db")
    service = QueueService(store, Settings(data_dir=tmp_path))
    try:
        ids = [service.submit(ENDPOINT, INPUT).job.id for _ in range(500)]
    finally:
        store.close()

    parsed = [uuid.UUID(request_id) for request_id in ids]
    assert {request_id.version for request_id in parsed} == {7}
    assert [str(request_id) for request_id in parsed] == ids  # canonical lower-case form
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
