"""Fixture engines of the fault tests, run inside real worker processes (``fault_worker.py``).

Each answers one small JPEG, so a worker costs milliseconds per job instead of a diffusion
model's seconds, while everything around the engine (claim, lease, heartbeat, progress,
cancel, publish to the file store, fenced finish) is production code.

* ``slow``: ``steps`` steps of ``step_s`` seconds, reporting each and polling ``should_cancel``
  after each, like the real pipeline (``steps=1, step_s=0``: an instant engine).
* ``poison``: as ``slow``, except that a request whose prompt is ``poison`` SIGKILLs its own
  process in the first step, on every attempt (a request that always crashes its worker).
* ``stubborn``: sleeps ``steps * step_s`` reporting progress but never polling
  ``should_cancel``, then answers: a worker that cannot notice it lost its lease before its
  result is ready (the case fencing exists for).
"""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Callable

from PIL import Image

from kontext_server.domain.editing import EditPipeline, EditRequest, EditResult, EncodedImage
from kontext_server.domain.errors import EditCancelled

__all__ = ["POISON_PROMPT", "make_engine"]

POISON_PROMPT = "poison"

StepCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


def _small_jpeg() -> EncodedImage:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "green").save(buffer, format="JPEG")
    return EncodedImage(buffer.getvalue(), 16, 16, "image/jpeg")


class SlowEngine:
    random_weights = True

    def __init__(self, steps: int, step_s: float) -> None:
        self.steps, self.step_s = steps, step_s
        self.default_steps = steps

    def edit(
        self,
        request: EditRequest,
        *,
        on_step: StepCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> EditResult:
        for step in range(1, self.steps + 1):
            if self.step_s:
                time.sleep(self.step_s)
            if on_step is not None:
                on_step(step, self.steps)
            if should_cancel is not None and should_cancel():
                raise EditCancelled(f"stopped after step {step}")
        return EditResult([_small_jpeg()], seed=request.seed or 1, random_weights=True)


class PoisonEngine(SlowEngine):
    def edit(
        self,
        request: EditRequest,
        *,
        on_step: StepCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> EditResult:
        if request.prompt == POISON_PROMPT:
            os.kill(os.getpid(), signal.SIGKILL)  # like an OOM kill: nothing gets recorded
        return super().edit(request, on_step=on_step, should_cancel=should_cancel)


class StubbornEngine(SlowEngine):
    def edit(
        self,
        request: EditRequest,
        *,
        on_step: StepCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> EditResult:
        for step in range(1, self.steps + 1):
            time.sleep(self.step_s)
            if on_step is not None:
                on_step(step, self.steps)
        return EditResult([_small_jpeg()], seed=request.seed or 1, random_weights=True)


_ENGINES: dict[str, type[SlowEngine]] = {
    "slow": SlowEngine,
    "poison": PoisonEngine,
    "stubborn": StubbornEngine,
}


def make_engine(name: str, steps: int, step_s: float) -> EditPipeline:
    """The engine called ``name`` (``slow``, ``poison``, ``stubborn``)."""
    return _ENGINES[name](steps, step_s)
