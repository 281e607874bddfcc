"""Delivery of webhooks from the job store's durable outbox (PROTOCOL.md §9).

The store enqueues one outbox row when a job with a ``webhook_url`` reaches a final status,
in the same transaction. :class:`WebhookDispatcher` runs in the API process (never in a
worker, never inline with a request): it claims due rows, builds fal's body for the job,
signs it and POSTs it through the SSRF-safe :class:`~kontext_server.net.fetch.SafeFetcher`.

* a 2xx answer is a delivery; anything else (3xx included: redirects are never followed),
  a network error or a timeout is a failed attempt, retried after ``backoff_s(attempts)``;
* after ``max_attempts`` failed attempts, or at once when the URL is refused by the address
  policy or the job is gone, the row is given up;
* delivery is at least once: a process that dies mid-send leaves its claim to expire and
  another process sends again.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kontext_server.domain.errors import ImageFetchError
from kontext_server.domain.jobs import Job, WebhookDelivery
from kontext_server.net.fetch import SafeFetcher, URLNotAllowedError
from kontext_server.store.base import JobStore
from kontext_server.webhooks.signing import WebhookSigner

__all__ = [
    "ANONYMOUS_USER_ID",
    "DEFAULT_MAX_ATTEMPTS",
    "WebhookDispatcher",
    "default_backoff_s",
    "webhook_body",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 10
ANONYMOUS_USER_ID = "anonymous"  # X-Fal-Webhook-User-Id of jobs submitted without a key
_FIRST_RETRY_S = 15.0
_LONGEST_WAIT_S = 3600.0
_CLAIM_MARGIN_S = 30.0  # a claim outlives the slowest send by this much


def default_backoff_s(failed_attempts: int) -> float:
    """Seconds to wait after ``failed_attempts`` failures: 15 s, doubling, at most 1 h.

    With 10 attempts the 9 waits add up to about 2 h 4 min, like fal's schedule.
    """
    return min(_FIRST_RETRY_S * 2.0 ** max(failed_attempts - 1, 0), _LONGEST_WAIT_S)


def webhook_body(payload: dict[str, Any]) -> bytes:
    """Compact JSON of ``payload``. An output that cannot be serialised (NaN, a stray object)
    is replaced by ``payload: null`` plus ``payload_error``, as fal does."""
    try:
        return _compact_json(payload)
    except (TypeError, ValueError) as exc:
        fallback = {k: v for k, v in payload.items() if k != "payload"}
        fallback.update(payload=None, payload_error=f"the output cannot be serialised: {exc}")
        try:
            return _compact_json(fallback)
        except (TypeError, ValueError):
            keep = ("request_id", "gateway_request_id", "status", "payload", "payload_error")
            return _compact_json({k: fallback[k] for k in keep if k in fallback})


def _compact_json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class WebhookDispatcher:
    """Sends due webhooks from ``store``'s outbox; one per API process.

    ``payload_for(job)`` builds the body (``http.webhooks.JobWebhooks.payload``: fal's, or
    BFL's for a job submitted through the BFL API); ``extra_headers_for(job, body)`` adds
    headers beside fal's signature (``JobWebhooks.headers``: BFL's HMAC). Each send may
    take ``timeout_s`` (default: the fetcher's ``timeout_s``); up to ``concurrency`` sends run
    at once so that one slow receiver does not hold up the others. ``clock`` must be the
    store's clock (retry times are compared with it).
    """

    def __init__(
        self,
        store: JobStore,
        signer: WebhookSigner,
        fetcher: SafeFetcher,
        payload_for: Callable[[Job], dict[str, Any]],
        *,
        extra_headers_for: Callable[[Job, bytes], dict[str, str]] | None = None,
        claimer_id: str,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_s: Callable[[int], float] = default_backoff_s,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
        concurrency: int = 8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._signer = signer
        self._fetcher = fetcher
        self._payload_for = payload_for
        self._extra_headers_for = extra_headers_for
        self._claimer_id = claimer_id
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._poll_s = poll_s
        self._timeout_s = fetcher.timeout_s if timeout_s is None else timeout_s
        self._concurrency = max(concurrency, 1)
        self._clock = clock

    def run_once(self) -> int:
        """Claim the due deliveries (up to ``concurrency``), attempt each; how many."""
        deliveries = self._store.claim_webhooks(
            self._claimer_id,
            limit=self._concurrency,
            lease_s=self._timeout_s + _CLAIM_MARGIN_S,
        )
        if len(deliveries) == 1:
            self._attempt(deliveries[0])
        elif deliveries:
            with concurrent.futures.ThreadPoolExecutor(
                max_workers=len(deliveries), thread_name_prefix="webhook"
            ) as pool:
                list(pool.map(self._attempt, deliveries))
        return len(deliveries)

    def run_forever(self, stop: threading.Event) -> None:
        """``run_once`` until ``stop`` is set, resting ``poll_s`` when nothing was due.

        Never raises: a failing store is logged and tried again after ``poll_s``.
        """
        while not stop.is_set():
            try:
                attempted = self.run_once()
            except Exception:
                log.exception("webhook dispatcher: claiming deliveries failed")
                attempted = 0
            if attempted == 0:
                stop.wait(self._poll_s)

    # --- one delivery ------------------------------------------------------------------------

    def _attempt(self, delivery: WebhookDelivery) -> None:
        try:
            self._send_and_record(delivery)
        except Exception:  # the claim expires and the delivery is tried again
            log.exception("webhook %s for job %s: attempt failed", delivery.id, delivery.job_id)

    def _send_and_record(self, delivery: WebhookDelivery) -> None:
        job = self._store.get(delivery.job_id)
        if job is None:
            self._give_up(delivery, "the job no longer exists")
            return
        try:
            body = webhook_body(self._payload_for(job))
        except Exception as exc:  # a bug or a store hiccup: count it, do not loop on it
            log.exception("webhook for job %s: building the body failed", job.id)
            self._failed(delivery, f"building the webhook body failed: {exc}")
            return
        try:
            error = self._post(delivery.url, job, body)
        except URLNotAllowedError as exc:
            self._give_up(delivery, str(exc))  # refused now, refused on every retry
            return
        if error is None:
            self._store.webhook_delivered(delivery.id)
            log.info("webhook for job %s delivered to %s", job.id, delivery.url)
        else:
            self._failed(delivery, error)

    def _post(self, url: str, job: Job, body: bytes) -> str | None:
        """POST the signed body; ``None`` on a 2xx answer, else what went wrong."""
        headers = {
            "Content-Type": "application/json",
            **self._signer.headers(job.id, job.owner or ANONYMOUS_USER_ID, body),
        }
        if self._extra_headers_for is not None:
            headers.update(self._extra_headers_for(job, body))
        try:
            status = self._fetcher.post(url, body, headers, self._timeout_s)
        except URLNotAllowedError:
            raise
        except ImageFetchError as exc:
            return str(exc)
        if 200 <= status < 300:
            return None
        if 300 <= status < 400:
            return f"{url} answered HTTP {status} (redirects are not followed)"
        return f"{url} answered HTTP {status}"

    def _failed(self, delivery: WebhookDelivery, error: str) -> None:
        failed_attempts = delivery.attempts + 1  # the store counts this attempt when told
        if failed_attempts >= self._max_attempts:
            self._give_up(delivery, error)
            return
        wait_s = self._backoff_s(failed_attempts)
        self._store.webhook_retry(delivery.id, self._clock() + wait_s, error)
        log.info(
            "webhook for job %s: attempt %d of %d failed (%s); next in %g s",
            delivery.job_id,
            failed_attempts,
            self._max_attempts,
            error,
            wait_s,
        )

    def _give_up(self, delivery: WebhookDelivery, error: str) -> None:
        self._store.webhook_give_up(delivery.id, error)
        log.warning(
            "webhook for job %s to %s given up after %d attempt(s): %s",
            delivery.job_id,
            delivery.url,
            delivery.attempts + 1,
            error,
        )
