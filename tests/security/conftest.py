"""Fixtures of the security tests: the real app over a real SQLite store and local files,
as in tests/http (whose helpers, ``http_support``, these tests reuse)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "http"))  # http_support

from http_support import AppFactory, PlayedWorker

from kontext_server.config import Settings
from kontext_server.files.local import LocalFileStore
from kontext_server.http.app import create_app
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.webhooks.signing import WebhookSigner


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


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
    """The app with fast stream timings and no background threads; settings overridable."""

    def make(**setting_overrides: Any) -> FastAPI:
        app_settings = settings.model_copy(update=setting_overrides)
        return create_app(
            app_settings,
            store,
            files,
            signer=signer,
            run_background=False,
            stream_keepalive_s=0.2,
            poll_interval_s=0.02,
        )

    return make
