"""Fixtures of the BFL engine tests: the stand-in BFL server, a store, a worker on them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from bfl_standin import API_KEY, StandInBfl
from bfl_support import ENGINES, FAST_LIMITS, Rig

from kontext_server.config import Settings
from kontext_server.core.service import QueueService
from kontext_server.files.local import LocalFileStore
from kontext_server.net.fetch import SafeFetcher
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.worker.bfl import BflClient, BflLimits, BflWorker


@pytest.fixture
def standin() -> Iterator[StandInBfl]:
    server = StandInBfl().start()
    yield server
    server.stop()


@pytest.fixture
def rig(tmp_path: Path, standin: StandInBfl) -> Iterator[Rig]:
    store = SQLiteJobStore(tmp_path / "jobs.db")
    files = LocalFileStore(tmp_path / "files")
    settings = Settings(data_dir=tmp_path, engines=ENGINES)
    clients: list[BflClient] = []

    def make_worker(
        worker_id: str = "bfl-1", limits: BflLimits = FAST_LIMITS, api_key: str = API_KEY
    ) -> BflWorker:
        clients.append(BflClient(standin.url, api_key, timeout_s=5.0))
        fetcher = SafeFetcher(
            allow_hosts=["127.0.0.1"], allow_ports=[], timeout_s=5.0, max_bytes=1 << 24
        )
        return BflWorker(store, files, clients[-1], fetcher, worker_id=worker_id, limits=limits)

    yield Rig(store, files, QueueService(store, settings), standin, make_worker)
    for client in clients:
        client.close()
    store.close()
