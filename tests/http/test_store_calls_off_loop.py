"""Where the API calls the job store: on the event loop for a local store (SQLite: a call is
cheaper than a thread hop), off it for one that waits on the network (PostgreSQL), so that
the loop serves other requests meanwhile: authentication, submits (group commit) and status
polls."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any, cast

import pytest
from fastapi import FastAPI
from http_support import LOOPBACK, MAX, edit_body
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from kontext_server.config import Settings
from kontext_server.core.auth import create_api_key
from kontext_server.files.local import LocalFileStore
from kontext_server.http.app import create_app
from kontext_server.logs import current_request_id
from kontext_server.store.base import JobStore
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.webhooks.signing import WebhookSigner


class ThreadRecordingStore:
    """A real SQLite store that records the thread of every call, and says whether it waits
    on the network as the test wants."""

    def __init__(self, inner: SQLiteJobStore, *, waits_on_network: bool) -> None:
        self.inner = inner
        self.waits_on_network = waits_on_network
        self.threads: defaultdict[str, set[threading.Thread]] = defaultdict(set)
        self.request_ids: defaultdict[str, set[str | None]] = defaultdict(set)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.threads[name].add(threading.current_thread())
            self.request_ids[name].add(current_request_id())
            return method(*args, **kwargs)

        return recorded


class LoopThread:
    """ASGI middleware that notes the thread requests are served on (the event loop's)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Any]) -> None:
        self.app = app
        self.threads: set[threading.Thread] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.threads.add(threading.current_thread())
        await self.app(scope, receive, send)


def _serve(
    settings: Settings,
    store: ThreadRecordingStore,
    files: LocalFileStore,
    signer: WebhookSigner,
    headers: dict[str, str],
) -> set[threading.Thread]:
    """A submit and a status poll; the threads the loop served them on. The poll's store
    calls ran with its request id in context (what log lines carry), wherever they ran."""
    app: FastAPI = create_app(
        settings, cast(JobStore, store), files, signer=signer, run_background=False
    )
    loop_thread = LoopThread(app)
    with TestClient(cast(Any, loop_thread), client=LOOPBACK) as client:
        submitted = client.post(f"/{MAX}", json=edit_body(), headers=headers)
        assert submitted.status_code == 200, submitted.text
        status = client.get(submitted.json()["status_url"], headers=headers)
        assert status.status_code == 202, status.text
    assert len(loop_thread.threads) == 1
    assert store.request_ids["get"] == {submitted.json()["request_id"]}
    return loop_thread.threads


@pytest.mark.parametrize("with_key", [False, True])
def test_a_store_on_the_network_is_called_off_the_event_loop(
    settings: Settings,
    store: SQLiteJobStore,
    files: LocalFileStore,
    signer: WebhookSigner,
    with_key: bool,
) -> None:
    recording = ThreadRecordingStore(store, waits_on_network=True)
    headers = {"Authorization": f"Key {create_api_key(store, 'alice')[1]}"} if with_key else {}

    loop_threads = _serve(settings, recording, files, signer, headers)

    called = ["has_api_keys", "submit_many", "queue_depth", "get", "queue_position_of"]
    if with_key:
        called.append("find_api_key")
    for name in called:
        assert recording.threads[name], f"{name} was not called"
        assert not recording.threads[name] & loop_threads, f"{name} ran on the event loop"
    # A status poll's read runs on the store's own threads, one per pooled connection.
    assert {thread.name.split("_")[0] for thread in recording.threads["get"]} == {"kontext-store"}


def test_a_local_store_is_called_on_the_event_loop(
    settings: Settings, store: SQLiteJobStore, files: LocalFileStore, signer: WebhookSigner
) -> None:
    recording = ThreadRecordingStore(store, waits_on_network=False)

    loop_threads = _serve(settings, recording, files, signer, {})

    for name in ["has_api_keys", "submit_many", "queue_depth", "get", "queue_position_of"]:
        assert recording.threads[name] == loop_threads, name
