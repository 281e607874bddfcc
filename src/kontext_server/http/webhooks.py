"""What the webhook dispatcher sends for a job, in the protocol it was submitted with.

``JobWebhooks.payload`` is the body (fal's, PROTOCOL.md §9; BFL's for a job submitted through
the BFL API, ``http/bfl/wire.py``) and ``JobWebhooks.headers`` what goes beside fal's
signature headers; the ``WebhookDispatcher`` (``webhooks/delivery.py``) asks for both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kontext_server.domain.jobs import Job
from kontext_server.files.base import FileStore
from kontext_server.http.bfl import wire as bfl
from kontext_server.http.fal import results as fal

__all__ = ["JobWebhooks"]


class JobWebhooks:
    """Webhook bodies and extra headers per job; file URLs use where the submitter reached
    us. ``clock`` stamps BFL's ``timestamp``."""

    def __init__(self, files: FileStore, *, clock: Callable[[], float] = time.time) -> None:
        self._files = files
        self._clock = clock

    def payload(self, job: Job) -> dict[str, Any]:
        """fal's webhook body; BFL's for a job submitted through the BFL API."""
        if bfl.is_bfl_job(job):
            return bfl.webhook_payload(job, self._files, now_s=self._clock())
        return fal.webhook_payload(job, self._files)

    def headers(self, job: Job, body: bytes) -> dict[str, str]:
        """Headers sent beside fal's signature headers: ``X-BFL-Signature`` (HMAC-SHA256 with
        the submitter's ``webhook_secret``) for a BFL job that gave one, else none."""
        return bfl.signature_headers(job, body)
