"""The BFL worker: the worker loop (``worker.loop``) on the BFL engine (``worker.bfl_engine``),
for jobs routed to Black Forest Labs' hosted FLUX.1 Kontext (docs/bfl-engine.md).

A worker kind with no GPU and no torch (``kontext-server worker --engine bfl``). It claims
only jobs whose ``engine`` is ``bfl`` and keeps up to ``bfl_max_in_flight`` of them in
flight. The HTTP client is ``worker.bfl_client``; the API key goes only to BFL's own hosts.
"""

from __future__ import annotations

import logging

from kontext_server.config import Settings
from kontext_server.domain.errors import ConfigError
from kontext_server.files import open_file_store
from kontext_server.files.base import FileStore
from kontext_server.net.fetch import SafeFetcher
from kontext_server.store import open_configured_store
from kontext_server.store.base import JobStore
from kontext_server.worker.bfl_client import BflClient
from kontext_server.worker.bfl_engine import BFL_ENGINE, BflEngine, BflLimits, bfl_request_body
from kontext_server.worker.loop import WorkerLoop, default_worker_id, run_until_signalled

__all__ = ["BflClient", "BflLimits", "BflWorker", "bfl_request_body", "run_bfl_worker"]

log = logging.getLogger(__name__)


class BflWorker(WorkerLoop[BflEngine]):
    """Runs ``bfl`` jobs from ``store`` through ``client``, up to ``limits.max_in_flight``
    at once. ``drain`` may be called from a signal handler: jobs in flight are handed back
    when its time is up, their upstream tasks recorded, so the next worker resumes them."""

    def __init__(
        self,
        store: JobStore,
        files: FileStore,
        client: BflClient,
        fetcher: SafeFetcher,
        *,
        worker_id: str,
        limits: BflLimits | None = None,
    ) -> None:
        engine = BflEngine(store, files, client, fetcher, limits=limits)
        super().__init__(store, engine, worker_id=worker_id)


def run_bfl_worker(settings: Settings, worker_id: str | None = None) -> None:
    """``kontext-server worker --engine bfl``: run until SIGTERM/SIGINT, then drain."""
    from kontext_server.worker.main import make_fetcher

    if settings.bfl_api_key is None or not settings.bfl_api_key.get_secret_value():
        raise ConfigError(
            "the BFL engine needs an API key: set KONTEXT_BFL_API_KEY (from"
            " https://api.bfl.ai) before starting `kontext-server worker --engine bfl`"
        )
    routed = sorted(e for e, engine in settings.engines.items() if engine == BFL_ENGINE)
    worker_id = worker_id or default_worker_id("bfl-")
    store = open_configured_store(settings)
    files = open_file_store(settings.files_url(), settings)
    client = BflClient(
        settings.bfl_base_url,
        settings.bfl_api_key.get_secret_value(),
        timeout_s=settings.bfl_request_timeout_s,
    )
    worker = BflWorker(
        store,
        files,
        client,
        make_fetcher(settings),
        worker_id=worker_id,
        limits=BflLimits.from_settings(settings),
    )
    log.info(
        "BFL worker %s ready (%s, up to %d in flight; routed: %s)",
        worker_id,
        client.base_url,
        settings.bfl_max_in_flight,
        ", ".join(routed) or "no endpoint yet (set KONTEXT_ENGINES)",
    )
    try:
        run_until_signalled(worker, drain_timeout_s=settings.drain_timeout_s)
    finally:
        client.close()
        store.close()
        log.info("BFL worker %s stopped", worker_id)
