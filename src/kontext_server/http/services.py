"""``ApiServices``: what the API process works with, built once per app from the settings and
the stores: the queue service, the authenticator, the webhook signer, what webhooks say
(``JobWebhooks``) and the URL policies. ``build_app`` (``http/app.py``) serves them; the
threads of ``http/background.py`` run beside it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kontext_server.config import Settings
from kontext_server.core.auth import Authenticator
from kontext_server.core.service import QueueService
from kontext_server.files.base import FileStore
from kontext_server.http.webhooks import JobWebhooks
from kontext_server.net.fetch import SafeFetcher
from kontext_server.store.base import JobStore
from kontext_server.webhooks.signing import WebhookSigner

__all__ = ["WEBHOOK_KEY_FILE", "ApiServices", "webhook_fetcher"]

WEBHOOK_KEY_FILE = "webhook-ed25519.pem"  # under Settings.data_dir
_WEBHOOK_RESPONSE_MAX_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ApiServices:
    """The API's services over one job store and one file store (the caller owns, and
    closes, both). ``url_checker`` judges URLs at submit, ``webhook_fetcher`` delivers
    webhooks; ``clock`` is the store's clock."""

    settings: Settings
    store: JobStore
    files: FileStore
    signer: WebhookSigner
    queue: QueueService
    authenticator: Authenticator
    webhooks: JobWebhooks
    url_checker: SafeFetcher
    webhook_fetcher: SafeFetcher
    clock: Callable[[], float]

    @classmethod
    def build(
        cls,
        settings: Settings,
        store: JobStore,
        files: FileStore,
        *,
        signer: WebhookSigner | None = None,
        fetcher: SafeFetcher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> ApiServices:
        """``signer`` defaults to the key in ``settings.data_dir`` (created on first use);
        ``fetcher`` (webhook delivery) to a ``SafeFetcher`` with the settings' allow-list."""
        return cls(
            settings=settings,
            store=store,
            files=files,
            signer=signer or WebhookSigner.load_or_create(settings.data_dir / WEBHOOK_KEY_FILE),
            queue=QueueService(store, settings, clock=clock),
            authenticator=Authenticator.from_settings(store, settings),
            webhooks=JobWebhooks(files, clock=clock),
            url_checker=webhook_fetcher(settings),
            webhook_fetcher=fetcher or webhook_fetcher(settings),
            clock=clock,
        )


def webhook_fetcher(settings: Settings) -> SafeFetcher:
    """The settings' address policy for webhooks (and the URLs checked at submit): no
    redirects, a small answer."""
    return SafeFetcher(
        allow_hosts=settings.fetch_allow_hosts,
        allow_ports=settings.fetch_allow_ports,
        timeout_s=settings.webhook_timeout_s,
        max_bytes=_WEBHOOK_RESPONSE_MAX_BYTES,
        max_redirects=0,
    )
