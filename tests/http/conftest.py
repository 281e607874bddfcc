"""Fixtures for the HTTP tests: the real app over a real SQLite store and a local file store
in ``tmp_path``, driven with Starlette's TestClient (in-process) or over real loopback HTTP
(uvicorn in a thread). There is no worker: ``PlayedWorker`` plays one with the store's
worker-side calls."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from http_support import LOOPBACK, AppFactory, LiveServer, PlayedWorker
from starlette.testclient import TestClient

from kontext_server.config import Settings
from kontext_server.files.local import LocalFileStore
from kontext_server.http.app import create_app
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.webhooks.signing import WebhookSigner


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", fetch_allow_hosts=["127.0.0.1"])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteJobStore]:
    job_store = SQLiteJobStore(tmp_path / "jobs.db")
    yield job_store
    job_store.close()


@pytest.fixture
def files(tmp_path: Path) -> LocalFileStore:
    return LocalFileStore(tmp_path / "files")


@pytest.fixture
def signer(tmp_path: Path) -> WebhookSigner:
    return WebhookSigner.load_or_create(tmp_path / "webhook-key.pem")


@pytest.fixture
def worker(store: SQLiteJobStore, files: LocalFileStore) -> PlayedWorker:
    return PlayedWorker(store, files)


@pytest.fixture
def make_app(
    settings: Settings, store: SQLiteJobStore, files: LocalFileStore, signer: WebhookSigner
) -> AppFactory:
    """The app with fast stream timings and no background threads unless asked."""

    def make(**overrides: Any) -> FastAPI:
        options: dict[str, Any] = {
            "signer": signer,
            "run_background": False,
            "stream_keepalive_s": 0.2,
            "poll_interval_s": 0.02,
            **overrides,
        }
        app_settings = options.pop("settings", settings)
        return create_app(app_settings, store, files, **options)

    return make


@pytest.fixture
def app(make_app: AppFactory) -> FastAPI:
    return make_app()


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """An in-process client that looks like a loopback caller."""
    with TestClient(app, client=LOOPBACK) as test_client:
        yield test_client


@pytest.fixture
def live_server(app: FastAPI) -> Iterator[LiveServer]:
    with LiveServer(app) as server:
        yield server
