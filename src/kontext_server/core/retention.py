"""``CleanupLoop``: finished jobs past their retention go, with their events and files.

Every API process runs one (started with the app). Each pass asks the job store to purge
expired jobs in batches (``JobStore.purge_expired``: rows, events and outbox rows in one go;
safe when several processes purge at once) and then deletes the purged jobs' output files.
A job's retention runs from when it finished: the job's own ``retention_s`` when the client
asked for one (the skin reads it from the request), else the store's default
(``result_retention_s``, 30 days).

Rows go before files: once a row is gone nobody can be handed a link to its files. A crash
between the two leaves orphaned files (unguessable keys, never linked again), not links to
missing files.
"""

from __future__ import annotations

import logging

from kontext_server.core.periodic import PeriodicTask
from kontext_server.domain.jobs import PurgedJob
from kontext_server.files.base import FileStore
from kontext_server.store.base import JobStore

__all__ = ["DEFAULT_CLEANUP_BATCH", "CleanupLoop"]

log = logging.getLogger(__name__)

DEFAULT_CLEANUP_BATCH = 500  # jobs per purge_expired call: short transactions, bounded memory


class CleanupLoop:
    """Purges expired jobs and deletes their files every ``interval_s`` on a daemon thread
    (first pass at ``start()``). ``start()`` / ``stop()``; the thread never dies of an error,
    it logs and tries again next interval. ``run_once()`` runs one pass in the caller's
    thread (and does raise: for tests and tools)."""

    def __init__(
        self,
        store: JobStore,
        files: FileStore,
        *,
        interval_s: float,
        batch: int = DEFAULT_CLEANUP_BATCH,
    ) -> None:
        if interval_s <= 0 or batch < 1:
            raise ValueError(f"interval_s must be > 0 and batch >= 1 (got {interval_s}, {batch})")
        self._store = store
        self._files = files
        self._batch = batch
        self._task = PeriodicTask("retention-cleanup", self.run_once, interval_s)

    def run_once(self) -> int:
        """Purge until less than a full batch comes back (or ``stop()``); returns how many
        jobs were purged. A file that cannot be deleted is logged and skipped."""
        purged = 0
        while True:
            jobs = self._store.purge_expired(self._batch)
            self._delete_files(jobs)
            purged += len(jobs)
            if len(jobs) < self._batch or self._task.stopping:
                break
        if purged:
            log.info("retention: purged %d finished job(s) and their files", purged)
        return purged

    def start(self) -> None:
        self._task.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._task.stop(timeout_s)

    def _delete_files(self, jobs: list[PurgedJob]) -> None:
        for job in jobs:
            for key in job.file_keys:
                try:
                    self._files.delete(key)
                except Exception:  # one bad file must not keep the others
                    log.exception("retention: cannot delete file %s of job %s", key, job.id)
