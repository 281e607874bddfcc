"""Shared fixtures of the engine tests: one tiny random Kontext pipeline per session (CPU)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kontext_server.worker.models import load_kontext_pipeline
from kontext_server.worker.pipeline import KontextPipeline

SMALL_AREA_PX = 64 * 64  # outputs and references of the fast tests: ~64x64 instead of ~1 MP


@pytest.fixture(scope="session")
def tiny_diffusers_pipe():  # type: ignore[no-untyped-def]
    pipe, random_weights = load_kontext_pipeline("tiny", device="cpu")
    assert random_weights
    return pipe


@pytest.fixture(scope="session")
def engine(tiny_diffusers_pipe) -> Iterator[KontextPipeline]:  # type: ignore[no-untyped-def]
    """The engine at BFL's real ~1 MP sizes (about 1.5 s per 2-step edit on 2 cores)."""
    pipeline = KontextPipeline(tiny_diffusers_pipe, random_weights=True, model_name="tiny")
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="session")
def small_engine(tiny_diffusers_pipe) -> Iterator[KontextPipeline]:  # type: ignore[no-untyped-def]
    """The same engine with every size scaled down to ~64x64 pixels (milliseconds per edit)."""
    pipeline = KontextPipeline(
        tiny_diffusers_pipe,
        random_weights=True,
        model_name="tiny",
        area_px=SMALL_AREA_PX,
        multi_reference_budget_px=2 * SMALL_AREA_PX,
    )
    yield pipeline
    pipeline.close()
