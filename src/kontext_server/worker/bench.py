"""Speed of the engine: load time, per-step and end-to-end times, peak memory.

One reference of ``size_px x size_px``; the output is made at the same size (``area_px``),
so ``size_px=1024`` is BFL's 1 MP square bucket and a small size keeps a CPU run short.
Per-step times are the gaps between consecutive step callbacks, with the GPU synchronised at
each callback so that queued kernels are counted in the step that launched them.
"""

from __future__ import annotations

import itertools
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from kontext_server.editing import EditRequest
from kontext_server.worker.pipeline import KontextPipeline

__all__ = ["BenchOptions", "run_bench"]

_PROMPT = "Change the car's color to red and keep everything else the same"


@dataclass(frozen=True)
class BenchOptions:
    model: str = "tiny"
    size_px: int = 1024
    steps: int = 28
    runs: int = 5
    warmup: int = 1
    device: str | None = None
    config_dir: Path | None = None
    allow_download: bool = False


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Load the model, run ``warmup`` untimed and ``runs`` timed edits; return the numbers
    as a JSON-ready dict (seconds, milliseconds and bytes in the key names)."""
    if options.size_px < 16 or options.steps < 1 or options.runs < 1 or options.warmup < 0:
        raise ValueError("size must be >= 16, steps and runs >= 1, warmup >= 0")
    started = time.perf_counter()
    engine = KontextPipeline.load(
        options.model,
        device=options.device,
        config_dir=options.config_dir,
        allow_download=options.allow_download,
    )
    load_s = time.perf_counter() - started
    engine.area_px = options.size_px * options.size_px
    try:
        request = _request(options)
        for _ in range(options.warmup):
            _timed_edit(engine, request)
        _reset_peak_memory(engine.device)
        measured = [_timed_edit(engine, request) for _ in range(options.runs)]
    finally:
        engine.close()
    step_ms = [ms for _, steps in measured for ms in steps]
    end_to_end_s = [seconds for seconds, _ in measured]
    memory_kind, peak_bytes = _peak_memory(engine.device)
    return {
        "model": options.model,
        "random_weights": engine.random_weights,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "size_px": options.size_px,
        "steps": options.steps,
        "runs": options.runs,
        "warmup": options.warmup,
        "load_s": load_s,
        "step_ms": _min_median(step_ms),
        "end_to_end_s": _min_median(end_to_end_s),
        "peak_memory_bytes": peak_bytes,
        "peak_memory_kind": memory_kind,
    }


def _request(options: BenchOptions) -> EditRequest:
    pixels = np.random.default_rng(0).integers(
        0, 255, (options.size_px, options.size_px, 3), dtype=np.uint8
    )
    return EditRequest(
        prompt=_PROMPT,
        images=[Image.fromarray(pixels)],
        seed=0,
        num_inference_steps=options.steps,
        output_format="jpeg",
    )


def _timed_edit(engine: KontextPipeline, request: EditRequest) -> tuple[float, list[float]]:
    """End-to-end seconds and per-step milliseconds of one edit."""
    device = engine.device
    stamps: list[float] = []

    def on_step(step: int, total: int) -> None:
        _synchronize(device)
        stamps.append(time.perf_counter())

    _synchronize(device)
    started = time.perf_counter()
    engine.edit(request, on_step=on_step)
    _synchronize(device)
    total_s = time.perf_counter() - started
    steps_ms = [1000.0 * (later - earlier) for earlier, later in itertools.pairwise(stamps)]
    return total_s, steps_ms


def _min_median(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "median": None}
    return {"min": min(values), "median": statistics.median(values)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> tuple[str, int]:
    """CUDA's peak allocated bytes on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return "cuda_max_memory_allocated", int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return "process_peak_rss", int(peak if sys.platform == "darwin" else peak * 1024)
