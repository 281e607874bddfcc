"""The daemon threads beside the API, started and stopped with the app (its lifespan): the
queue maintenance loop (lost workers, start deadlines), the retention cleanup (expired
results and their files) and the webhook dispatcher (the durable outbox)."""

from __future__ import annotations

import gc
import os
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI

from kontext_server.core.retention import CleanupLoop
from kontext_server.core.service import MaintenanceLoop
from kontext_server.http.services import ApiServices
from kontext_server.webhooks.delivery import WebhookDispatcher

__all__ = ["Background"]


class Background:
    """The maintenance loop, the retention cleanup and the webhook dispatcher. With
    ``enabled=False`` none of them starts (tests that drive them by hand); the
    ``shutdown_hooks`` run when the app stops; ``freeze_heap`` is ``build_app``'s."""

    def __init__(
        self,
        maintenance: MaintenanceLoop,
        cleanup: CleanupLoop,
        dispatcher: WebhookDispatcher,
        *,
        enabled: bool,
        shutdown_hooks: Sequence[Callable[[], None]] = (),
        freeze_heap: bool = False,
    ) -> None:
        self._freeze_heap = freeze_heap
        self._shutdown_hooks = list(shutdown_hooks)
        self._maintenance = maintenance
        self._cleanup = cleanup
        self._dispatcher = dispatcher
        self._enabled = enabled
        self._stop = threading.Event()
        self._dispatcher_thread: threading.Thread | None = None

    @classmethod
    def for_services(
        cls,
        services: ApiServices,
        *,
        enabled: bool,
        maintenance_interval_s: float,
        shutdown_hooks: Sequence[Callable[[], None]] = (),
        freeze_heap: bool = False,
    ) -> Background:
        store, settings = services.store, services.settings
        dispatcher = WebhookDispatcher(
            store,
            services.signer,
            services.webhook_fetcher,
            services.webhooks.payload,
            extra_headers_for=services.webhooks.headers,
            claimer_id=f"api-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
            max_attempts=settings.webhook_max_attempts,
            clock=services.clock,
        )
        return cls(
            MaintenanceLoop(store, interval_s=maintenance_interval_s),
            CleanupLoop(store, services.files, interval_s=settings.cleanup_interval_s),
            dispatcher,
            enabled=enabled,
            shutdown_hooks=shutdown_hooks,
            freeze_heap=freeze_heap,
        )

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.start()
        if self._freeze_heap:
            gc.collect()  # what is garbage now is freed, not frozen
            gc.freeze()
        try:
            yield
        finally:
            self.stop()
            for hook in self._shutdown_hooks:
                hook()

    def start(self) -> None:
        if not self._enabled:
            return
        self._stop.clear()
        self._maintenance.start()
        self._cleanup.start()
        self._dispatcher_thread = threading.Thread(
            target=self._dispatcher.run_forever, args=(self._stop,), name="webhooks", daemon=True
        )
        self._dispatcher_thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._maintenance.stop()
        self._cleanup.stop()
        if self._dispatcher_thread is not None:
            self._dispatcher_thread.join(10.0)
            self._dispatcher_thread = None
