"""``PeriodicTask``: one pass of some maintenance every ``interval_s`` on a daemon thread.

The API process runs several (lease and deadline maintenance, retention, upload cleanup);
each pass's failure (a locked or unreachable store, a full disk) is logged and retried at the
next interval, so the thread never dies of an error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["PeriodicTask"]

log = logging.getLogger(__name__)


class PeriodicTask:
    """Calls ``run_once`` at ``start()`` and then every ``interval_s`` until ``stop()``."""

    def __init__(self, name: str, run_once: Callable[[], object], interval_s: float) -> None:
        self.name = name
        self._run_once = run_once
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called: a long pass may end early."""
        return self._stop.is_set()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._run_once()
            except Exception:
                log.exception("%s failed; retrying in %g s", self.name, self._interval_s)
            self._stop.wait(self._interval_s)
