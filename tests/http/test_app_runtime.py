"""How the app runs, beyond its routes: FastAPI's native OpenTelemetry is off unless
``KONTEXT_OPENTELEMETRY`` turns it on, and ``freeze_heap`` moves the started app's objects
out of the garbage collector's reach."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_support import LOOPBACK, AppFactory
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from kontext_server.config import Settings

SUBMIT = {"prompt": "make it blue", "image_url": "https://example.com/in.png"}

# OpenTelemetry's global tracer provider can be set once per process.
_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    yield _EXPORTER
    # The provider stays (it cannot be unset): later apps' spans are dropped, not kept.
    _EXPORTER.shutdown()


def _submit_through(make_app: AppFactory, settings: Settings) -> None:
    with TestClient(make_app(settings=settings), client=LOOPBACK) as client:
        answer = client.post("/fal-ai/flux-pro/kontext/max", json=SUBMIT)
    assert answer.status_code == 200, answer.text


def test_opentelemetry_is_off_by_default(
    make_app: AppFactory, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    spans.clear()

    _submit_through(make_app, Settings(data_dir=tmp_path / "data"))

    assert spans.get_finished_spans() == ()


def test_kontext_opentelemetry_turns_on_request_spans(
    make_app: AppFactory,
    tmp_path: Path,
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KONTEXT_OPENTELEMETRY", "true")
    spans.clear()

    _submit_through(make_app, Settings(data_dir=tmp_path / "data"))

    names = [span.name for span in spans.get_finished_spans()]
    assert any("POST" in name and "kontext/max" in name for name in names), names


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # other tests create and drop many apps: let them be collected


def test_freeze_heap_freezes_the_started_app(make_app: AppFactory, unfrozen: None) -> None:
    with TestClient(make_app(freeze_heap=True), client=LOOPBACK) as client:
        frozen = gc.get_freeze_count()
        assert client.get("/healthz").status_code == 200

    assert frozen > 1000  # the app, its routes, schemas and modules


def test_apps_do_not_freeze_the_heap_unless_asked(make_app: AppFactory, unfrozen: None) -> None:
    with TestClient(make_app(), client=LOOPBACK) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() == 0
