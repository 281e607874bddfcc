"""Speed of the engine per speed preset and memory mode, and how far a preset moves the result.

One reference of ``size_px x size_px``; the output is made at the same size (``area_px``),
so ``size_px=1024`` is BFL's 1 MP square bucket and a small size keeps a CPU run short.

What one bench run (:func:`run_bench`) measures, in this order:

1. **load**: the model loaded and the preset's levers applied (``load_s``);
2. **first edit** (``first_edit_s``): where ``torch.compile`` compiles, so cold start is
   load + first edit. This edit is also the **deviation** edit: with the final latents
   captured, its latents (``latents.pt``) and its PNG image (``output.png``) are saved into the
   run's folder, for :func:`deviation` against the ``none`` preset on the same seed and input;
3. ``warmup`` untimed edits, then ``runs`` timed edits, each with a new prompt (the text
   encoders run, as for a new request): per-step times (the gaps between step callbacks, the
   GPU synchronised at each one) and end-to-end times;
4. the **prompt-embedding cache**: the engine's preparation (references + prompt) for a new
   prompt (a miss: T5 and CLIP run) against the same prompt again (a hit).

Peak memory: CUDA's ``max_memory_allocated`` from the end of loading on; on the CPU the
process's peak resident set size. ``memory_limit_gb`` caps the CUDA caching allocator after
loading (``torch.cuda.set_per_process_memory_fraction``) so that a smaller GPU is emulated.

:func:`run_compare` runs each entry (``preset`` or ``preset@memory``) in a fresh child process
(``python -m kontext_server.worker.bench``) under a timeout, saves its JSON as soon as it ends
and prints :func:`format_table`. This module's ``__main__`` needs only the engine's imports
(torch, diffusers, pydantic-settings): no FastAPI, uvicorn or typer.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from kontext_server.domain.engine_options import PRESETS, parse_memory_mode

if TYPE_CHECKING:
    import torch

    from kontext_server.domain.editing import EditRequest
    from kontext_server.worker.pipeline import KontextPipeline

__all__ = [
    "BenchOptions",
    "CompareEntry",
    "deviation",
    "format_table",
    "load_results",
    "main",
    "parse_entries",
    "run_bench",
    "run_compare",
    "summarize",
]

_PROMPT = "Change the car's color to red and keep everything else the same"
LATENTS_FILE = "latents.pt"
IMAGE_FILE = "output.png"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "table.txt"
BASELINE_ENTRY = "none"
_PROMPT_CACHE_PROBES = 5
_GIB = 1024**3


@dataclass(frozen=True)
class BenchOptions:
    model: str = "tiny"
    size_px: int = 1024
    steps: int = 28
    runs: int = 3
    warmup: int = 0
    device: str | None = None
    config_dir: Path | None = None
    allow_download: bool = False
    acceleration: str = "none"
    memory: str = "resident"
    cache_threshold: float | None = None  # None: the engine's default
    memory_limit_gb: float | None = None  # CUDA only: cap the allocator after loading
    out_dir: Path | None = None  # the deviation's latents and image go to out_dir/<entry>/
    compile_cache_dir: Path | None = None  # None: out_dir/<entry>/compile-cache or a temp dir
    entry: str | None = None  # the name in the compare table; None: preset[@memory]
    seed: int = 0

    @property
    def name(self) -> str:
        if self.entry:
            return self.entry
        memory = str(parse_memory_mode(self.memory))
        return self.acceleration if memory == "resident" else f"{self.acceleration}@{memory}"


@dataclass(frozen=True)
class CompareEntry:
    """One column of ``--compare``: ``preset`` or ``preset@memory``."""

    preset: str
    memory: str = "resident"

    @property
    def name(self) -> str:
        return self.preset if self.memory == "resident" else f"{self.preset}@{self.memory}"


def parse_entries(text: str) -> list[CompareEntry]:
    """``"none,compile,none@model-offload"`` -> entries; raises ``ValueError`` naming what is
    allowed (presets, memory modes) or a repeated entry."""
    entries: list[CompareEntry] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        preset, _, memory = part.partition("@")
        preset = preset.strip().lower()
        if preset not in PRESETS:
            raise ValueError(f"--compare entry {part!r}: preset {preset!r}; allowed: {PRESETS}")
        mode = str(parse_memory_mode(memory)) if memory.strip() else "resident"
        entry = CompareEntry(preset, mode)
        if entry in entries:
            raise ValueError(f"--compare entry {entry.name!r} is given twice")
        entries.append(entry)
    if not entries:
        raise ValueError("--compare needs at least one entry, e.g. none,compile,cache")
    return entries


def slug(name: str) -> str:
    """A file name for an entry: ``none@model-offload`` -> ``none_model-offload``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "entry"


# --- one bench run (in this process) ----------------------------------------------------------


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Load the engine with the options' preset and memory mode and measure it (see the module
    docstring); return the numbers as a JSON-ready dict (seconds, milliseconds and bytes in the
    key names). Raises ``ValueError`` for bad options, ``KontextError`` for what the engine
    cannot run here (fp8 on a CPU, a missing package)."""

    from kontext_server.worker.acceleration import DEFAULT_CACHE_THRESHOLD, Acceleration
    from kontext_server.worker.models import resolve_device
    from kontext_server.worker.pipeline import KontextPipeline

    if options.size_px < 16 or options.steps < 1 or options.runs < 1 or options.warmup < 0:
        raise ValueError("size must be >= 16, steps and runs >= 1, warmup >= 0")
    device = resolve_device(options.device)
    if options.memory_limit_gb is not None:
        if device.type != "cuda":
            raise ValueError(
                f"--memory-limit-gb caps CUDA memory; this run is on {device}. Drop the cap "
                "or run on a CUDA device."
            )
        if options.memory_limit_gb <= 0:
            raise ValueError("--memory-limit-gb must be > 0")
    run_dir = _run_dir(options)
    compile_cache = options.compile_cache_dir or (
        run_dir / "compile-cache"
        if options.out_dir is not None
        else Path(tempfile.mkdtemp(prefix="kontext-compile-"))
    )
    threshold = (
        DEFAULT_CACHE_THRESHOLD if options.cache_threshold is None else options.cache_threshold
    )
    acceleration = Acceleration(
        preset=options.acceleration,  # type: ignore[arg-type]  # checked by Acceleration
        memory=parse_memory_mode(options.memory),
        cache_threshold=threshold,
        compile_cache_dir=compile_cache,
    )
    started = time.perf_counter()
    engine = KontextPipeline.load(
        options.model,
        device=options.device,
        config_dir=options.config_dir,
        allow_download=options.allow_download,
        acceleration=acceleration,
    )
    load_s = time.perf_counter() - started
    engine.area_px = options.size_px * options.size_px
    try:
        memory_cap = _cap_memory(device, options.memory_limit_gb)
        resident_bytes = _allocated(device)
        _reset_peak_memory(device)
        request = _request(options, _PROMPT, output_format="png")
        engine.capture_latents = True
        first_edit_s, _, first = _timed_edit(engine, request)
        engine.capture_latents = False
        files = _save_deviation_artifacts(engine, first, run_dir, options.out_dir)
        for index in range(options.warmup):
            engine.edit(_request(options, f"{_PROMPT} (warmup {index})"))
        measured = [
            _timed_edit(engine, _request(options, f"{_PROMPT} (run {index})"))
            for index in range(options.runs)
        ]
        prompt_cache = _measure_prompt_cache(engine, options)
        memory_kind, peak_bytes = _peak_memory(device)
    finally:
        engine.close()
    step_ms = [ms for _, steps, _ in measured for ms in steps]
    end_to_end_s = [seconds for seconds, _, _ in measured]
    return {
        "entry": options.name,
        "status": "ok",
        "model": options.model,
        "random_weights": engine.random_weights,
        "acceleration": options.acceleration,
        "memory": str(acceleration.memory),
        "cache_threshold": threshold if acceleration.step_cache else None,
        "levers": list(engine.applied.levers),
        "attention_backend": engine.applied.attention_backend,
        "compile_cache_dir": str(compile_cache) if acceleration.compiles else None,
        "device": str(device),
        "device_name": _device_name(device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "versions": _versions(),
        "size_px": options.size_px,
        "steps": options.steps,
        "runs": options.runs,
        "warmup": options.warmup,
        "seed": options.seed,
        "prompt": _PROMPT,
        "load_s": load_s,
        "first_edit_s": first_edit_s,
        "first_edit_note": "compiles (compiling presets); also keeps the final latents and encodes "
        "a PNG (the deviation's artifacts)",
        "cold_start_s": load_s + first_edit_s,
        "step_ms": _min_median(step_ms),
        "end_to_end_s": _min_median(end_to_end_s),
        "end_to_end_note": "each timed run has a new prompt: the text encoders run",
        "peak_memory_bytes": peak_bytes,
        "peak_memory_kind": memory_kind,
        "resident_memory_bytes": resident_bytes,
        "memory_limit": memory_cap,
        "prompt_cache": prompt_cache,
        "files": files,
    }


def _run_dir(options: BenchOptions) -> Path:
    if options.out_dir is None:
        return Path(tempfile.mkdtemp(prefix="kontext-bench-"))
    folder = options.out_dir / slug(options.name)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _request(options: BenchOptions, prompt: str, output_format: str = "jpeg") -> EditRequest:
    from kontext_server.domain.editing import EditRequest

    pixels = np.random.default_rng(0).integers(
        0, 255, (options.size_px, options.size_px, 3), dtype=np.uint8
    )
    return EditRequest(
        prompt=prompt,
        images=[Image.fromarray(pixels)],
        seed=options.seed,
        num_inference_steps=options.steps,
        output_format=output_format,  # type: ignore[arg-type]
    )


def _timed_edit(engine: KontextPipeline, request: EditRequest) -> tuple[float, list[float], Any]:
    """End-to-end seconds, per-step milliseconds and the result of one edit."""
    device = engine.device
    stamps: list[float] = []

    def on_step(step: int, total: int) -> None:
        _synchronize(device)
        stamps.append(time.perf_counter())

    _synchronize(device)
    started = time.perf_counter()
    result = engine.edit(request, on_step=on_step)
    _synchronize(device)
    total_s = time.perf_counter() - started
    steps_ms = [1000.0 * (later - earlier) for earlier, later in itertools.pairwise(stamps)]
    return total_s, steps_ms, result


def _save_deviation_artifacts(
    engine: KontextPipeline, result: Any, folder: Path, out_dir: Path | None
) -> dict[str, str]:
    """The first edit's final latents (torch.save) and decoded image (PNG) in ``folder``;
    returns their paths, relative to ``out_dir`` when there is one (a results folder can be
    copied elsewhere and still be read)."""
    import torch

    if engine.last_latents is None:
        raise RuntimeError("the engine captured no latents (capture_latents had no effect)")
    torch.save(engine.last_latents, folder / LATENTS_FILE)
    (folder / IMAGE_FILE).write_bytes(result.images[0].data)
    paths = {"latents": folder / LATENTS_FILE, "image": folder / IMAGE_FILE}
    if out_dir is not None:
        paths = {key: path.relative_to(out_dir) for key, path in paths.items()}
    return {key: str(path) for key, path in paths.items()}


def _measure_prompt_cache(engine: KontextPipeline, options: BenchOptions) -> dict[str, Any]:
    """Seconds of the engine's prompt preparation (``_prepare`` of a request without images,
    so only the prompt's part runs) for a new prompt (miss: T5 and CLIP run) and for the same
    prompt again (hit: a lookup)."""
    from kontext_server.domain.editing import EditRequest

    misses: list[float] = []
    hits: list[float] = []
    for index in range(_PROMPT_CACHE_PROBES):
        request = EditRequest(prompt=f"{_PROMPT} (prompt cache probe {index})", images=[])
        misses.append(_timed_prepare(engine, request))
        hits.append(_timed_prepare(engine, request))
    miss_s, hit_s = statistics.median(misses), statistics.median(hits)
    return {
        "what": "the engine's prompt embedding (T5 + CLIP), median of "
        f"{_PROMPT_CACHE_PROBES}: a new prompt (miss) vs the same prompt again (hit)",
        "miss_s": miss_s,
        "hit_s": hit_s,
        "saving_s": miss_s - hit_s,
        "hits": engine.prompt_cache.hits,
        "misses": engine.prompt_cache.misses,
        "size": engine.prompt_cache.size,
    }


def _timed_prepare(engine: KontextPipeline, request: EditRequest) -> float:
    _synchronize(engine.device)
    started = time.perf_counter()
    engine._prepare(request)
    _synchronize(engine.device)
    return time.perf_counter() - started


def _cap_memory(device: torch.device, limit_gb: float | None) -> dict[str, Any] | None:
    """After loading and offload setup: free the allocator's cache and cap this process at
    ``limit_gb`` GiB of the GPU, so that a smaller GPU is emulated on a bigger one."""
    if limit_gb is None:
        return None
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    # The offload hooks report "cuda" without an index; the allocator's cap needs one.
    device = torch.device(
        "cuda", torch.cuda.current_device() if device.index is None else device.index
    )
    total = int(torch.cuda.get_device_properties(device).total_memory)
    limit_bytes = int(limit_gb * _GIB)
    if limit_bytes > total:
        raise ValueError(
            f"--memory-limit-gb {limit_gb:g} is more than this GPU has ({total / _GIB:.1f} GiB)"
        )
    fraction = limit_bytes / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return {"limit_gb": limit_gb, "fraction": fraction, "gpu_total_bytes": total}


def _min_median(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "median": None}
    return {"min": min(values), "median": statistics.median(values)}


def _synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _allocated(device: torch.device) -> int | None:
    import torch

    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None


def _peak_memory(device: torch.device) -> tuple[str, int]:
    """CUDA's peak allocated bytes on a GPU, else the process's peak resident set size."""
    import torch

    if device.type == "cuda":
        return "cuda_max_memory_allocated", int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return "process_peak_rss", int(peak if sys.platform == "darwin" else peak * 1024)


def _device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return platform.processor() or platform.machine() or "cpu"


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers", "torchao", "triton", "scikit-image"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


# --- compare: one child process per entry -----------------------------------------------------


def child_command(options: BenchOptions, json_path: Path) -> list[str]:
    """The command line that runs ``options`` in a fresh Python process."""
    command = [sys.executable, "-m", "kontext_server.worker.bench"]
    command += ["--model", options.model, "--size", str(options.size_px)]
    command += ["--steps", str(options.steps), "--runs", str(options.runs)]
    command += ["--warmup", str(options.warmup), "--seed", str(options.seed)]
    command += ["--acceleration", options.acceleration, "--memory", options.memory]
    command += ["--entry", options.name, "--json", str(json_path)]
    optional: list[tuple[str, object]] = [
        ("--device", options.device),
        ("--config-dir", options.config_dir),
        ("--cache-threshold", options.cache_threshold),
        ("--memory-limit-gb", options.memory_limit_gb),
        ("--out", options.out_dir),
        ("--compile-cache-dir", options.compile_cache_dir),
    ]
    for flag, value in optional:
        if value is not None:
            command += [flag, str(value)]
    if options.allow_download:
        command.append("--allow-download")
    return command


def run_child(options: BenchOptions, json_path: Path, timeout_s: float) -> dict[str, Any]:
    """Run one entry in a new process (its own process group, killed whole on timeout); the
    child writes ``json_path``; a child that times out or dies without writing it gets a
    ``timed out`` / ``failed`` record there instead. Returns the record."""
    json_path.unlink(missing_ok=True)
    log_path = json_path.with_suffix(".log")
    started = time.perf_counter()
    with log_path.open("wb") as log:
        child = subprocess.Popen(
            child_command(options, json_path),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # compile workers die with it
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            returncode = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            record = _status_record(
                options.name, f"timed out after {timeout_s:g} s", time.perf_counter() - started
            )
            _write_json(json_path, record)
            return record
    if json_path.exists():
        record = json.loads(json_path.read_text())
        record["wall_s"] = time.perf_counter() - started
        _write_json(json_path, record)
        return record
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    reason = f"failed: exit code {returncode}" + (f": {tail[-1]}" if tail else "")
    record = _status_record(options.name, reason, time.perf_counter() - started)
    _write_json(json_path, record)
    return record


def run_compare(
    options: BenchOptions,
    entries: Sequence[CompareEntry],
    out_dir: Path,
    entry_timeout_s: float,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Each entry in a fresh child process, its JSON saved in ``out_dir`` as soon as it ends
    (and ``summary.json`` updated); then the table. A failed or timed-out entry is recorded and
    the next one runs."""
    if options.runs < 3:
        raise ValueError("--compare needs --runs >= 3 (min and median of at least 3 runs)")
    out_dir.mkdir(parents=True, exist_ok=True)
    order: list[str] = []
    for entry in entries:
        child = replace(
            options,
            acceleration=entry.preset,
            memory=entry.memory,
            entry=entry.name,
            out_dir=out_dir,
        )
        echo(f"bench {entry.name}: running (timeout {entry_timeout_s:g} s)")
        record = run_child(child, out_dir / f"{slug(entry.name)}.json", entry_timeout_s)
        order.append(slug(entry.name))
        _write_json(out_dir / SUMMARY_FILE, {"order": order, "options": _jsonable(options)})
        echo(f"bench {entry.name}: {record['status']}")
    summary = summarize(out_dir)
    echo(summary["table"])
    return summary


def _status_record(entry: str, status: str, wall_s: float) -> dict[str, Any]:
    return {"entry": entry, "status": status, "wall_s": wall_s}


def _write_json(path: Path, data: Any) -> None:
    """Write atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(data, indent=2, default=str) + "\n")
    partial.replace(path)


def _jsonable(options: BenchOptions) -> dict[str, Any]:
    return {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in asdict(options).items()
    }


# --- deviation and the table --------------------------------------------------------------------


def deviation(
    baseline: dict[str, Any], other: dict[str, Any], folder: Path = Path(".")
) -> dict[str, Any]:
    """Relative L2 of the final latents, PSNR (dB) and SSIM of the decoded images of ``other``
    against ``baseline`` (same seed, input and prompt); relative file paths are under
    ``folder``. Values are None, with ``note`` saying why, where an artifact is missing or the
    shapes differ."""
    import torch

    result: dict[str, Any] = {"relative_l2": None, "psnr_db": None, "ssim": None, "note": None}
    base_files, files = baseline.get("files") or {}, other.get("files") or {}
    try:
        reference = torch.load(folder / base_files["latents"], map_location="cpu").float()
        latents = torch.load(folder / files["latents"], map_location="cpu").float()
        base_image = np.asarray(Image.open(folder / base_files["image"]).convert("RGB"))
        image = np.asarray(Image.open(folder / files["image"]).convert("RGB"))
    except (KeyError, OSError) as exc:
        result["note"] = f"artifacts missing: {exc}"
        return result
    if latents.shape != reference.shape or image.shape != base_image.shape:
        result["note"] = "shapes differ (different size or model)"
        return result
    norm = float(reference.norm())
    result["relative_l2"] = float((latents - reference).norm()) / norm if norm else math.nan
    result["psnr_db"], result["ssim"], result["note"] = image_similarity(base_image, image)
    return result


def image_similarity(
    reference: np.ndarray, image: np.ndarray
) -> tuple[float, float | None, str | None]:
    """PSNR (inf for identical images) and SSIM of two uint8 RGB images, with scikit-image
    (``pip install 'kontext-server[bench]'``); without it, PSNR from numpy and no SSIM."""
    difference = reference.astype(np.float64) - image.astype(np.float64)
    mse = float(np.mean(difference**2))
    try:
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    except ImportError:
        psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
        return psnr, None, "SSIM needs scikit-image (pip install 'kontext-server[bench]')"
    if mse == 0:  # skimage divides by zero (a RuntimeWarning) for identical images
        return math.inf, 1.0, None
    psnr = float(peak_signal_noise_ratio(reference, image, data_range=255))
    side = min(reference.shape[:2])
    window = min(7, side if side % 2 else side - 1)
    ssim = float(
        structural_similarity(reference, image, channel_axis=2, data_range=255, win_size=window)
    )
    return psnr, ssim, None


def load_results(out_dir: Path) -> list[dict[str, Any]]:
    """The entries' JSON records in ``out_dir``: in ``summary.json``'s order when there is one,
    else every ``*.json`` with an ``entry`` key, oldest first."""
    summary_path = out_dir / SUMMARY_FILE
    names: list[str] = []
    if summary_path.exists():
        names = list(json.loads(summary_path.read_text()).get("order", []))
    if not names:
        paths = sorted(out_dir.glob("*.json"), key=lambda path: path.stat().st_mtime)
        names = [path.stem for path in paths if path.name != SUMMARY_FILE]
    results = []
    for name in names:
        path = out_dir / f"{name}.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "entry" in record:
            results.append(record)
    return results


def summarize(out_dir: Path) -> dict[str, Any]:
    """Deviations against the ``none`` entry, the table (also written to ``table.txt``), and
    ``summary.json`` with both."""
    results = load_results(out_dir)
    baseline = next(
        (r for r in results if r.get("entry") == BASELINE_ENTRY and r.get("status") == "ok"), None
    )
    for record in results:
        if record.get("status") == "ok" and baseline is not None:
            record["deviation"] = deviation(baseline, record, out_dir)
    table = format_table(results, has_baseline=baseline is not None)
    (out_dir / TABLE_FILE).write_text(table + "\n")
    previous = {}
    if (out_dir / SUMMARY_FILE).exists():
        previous = json.loads((out_dir / SUMMARY_FILE).read_text())
    summary = {
        **previous,
        "order": [slug(str(r["entry"])) for r in results],
        "entries": results,
        "table": table,
    }
    _write_json(out_dir / SUMMARY_FILE, summary)
    return summary


_COLUMNS = (
    "entry",
    "load s",
    "first edit s",
    "step ms med",
    "e2e s min",
    "e2e s med",
    "peak GB",
    "cap GB",
    "text enc miss/hit ms",
    "rel L2",
    "PSNR dB",
    "SSIM",
    "status",
)


def format_table(results: Sequence[dict[str, Any]], *, has_baseline: bool = True) -> str:
    """A Markdown table of the entries, with a note on what the deviation means."""
    rows = [_row(record) for record in results]
    lines = [
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join("---" for _ in _COLUMNS) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    notes = [
        "",
        "Deviation (rel L2 of the final latents; PSNR and SSIM of the decoded PNGs) is against "
        f"the `{BASELINE_ENTRY}` entry: same weights, seed, input and prompt.",
    ]
    if not has_baseline:
        notes.append(f"No successful `{BASELINE_ENTRY}` entry here: add it for the deviation.")
    if any(record.get("random_weights") for record in results):
        notes.append(
            "These weights are RANDOM (tiny / dummy-full): the deviation of step caching and fp8 "
            "on random weights is NOT their deviation on real weights. Re-run with --model "
            "/path/to/FLUX.1-Kontext-dev (same --size, --steps and seed) for that."
        )
    kinds = {record.get("peak_memory_kind") for record in results} - {None}
    if "process_peak_rss" in kinds:
        notes.append("peak GB on the CPU is the process's peak resident set size.")
    return "\n".join(lines + notes)


def _row(record: dict[str, Any]) -> list[str]:
    cap = record.get("memory_limit") or {}
    prompt = record.get("prompt_cache") or {}
    found = record.get("deviation") or {}
    text_encoders = (
        f"{_fmt(_ms(prompt.get('miss_s')), '.0f')} / {_fmt(_ms(prompt.get('hit_s')), '.0f')}"
        if prompt
        else "–"
    )
    peak = record.get("peak_memory_bytes")
    return [
        str(record.get("entry")),
        _fmt(record.get("load_s"), ".1f"),
        _fmt(record.get("first_edit_s"), ".2f"),
        _fmt((record.get("step_ms") or {}).get("median"), ".1f"),
        _fmt((record.get("end_to_end_s") or {}).get("min"), ".2f"),
        _fmt((record.get("end_to_end_s") or {}).get("median"), ".2f"),
        _fmt(None if peak is None else peak / 1e9, ".2f"),
        _fmt(cap.get("limit_gb"), "g"),
        text_encoders,
        _fmt(found.get("relative_l2"), ".3g"),
        _fmt(found.get("psnr_db"), ".1f"),
        _fmt(found.get("ssim"), ".4f"),
        str(record.get("status", "?")).replace("|", "/").replace("\n", " ")[:160],
    ]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000.0 * seconds


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


# --- the environment (the GPU script's first stage) ---------------------------------------------


def environment() -> dict[str, Any]:
    """Python, packages, GPUs (``nvidia-smi -L`` when there) and what torch sees."""
    info: dict[str, Any] = {
        "stage": "env",
        "status": "ok",
        "versions": _versions(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    try:
        listed = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False
        )
        info["nvidia_smi"] = listed.stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"not available: {exc}"
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["cuda_devices"] = [
        torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())
    ]
    return info


# --- __main__ ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kontext_server.worker.bench",
        description="Bench the engine (one run, --compare in child processes, --table, --env).",
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--config-dir", type=Path, default=None)
    parser.add_argument("--allow-download", action="store_true")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--acceleration", default="none", choices=PRESETS)
    parser.add_argument("--memory", default="resident")
    parser.add_argument("--cache-threshold", type=float, default=None)
    parser.add_argument("--memory-limit-gb", type=float, default=None)
    parser.add_argument("--compile-cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--entry", default=None, help="name in the table (default preset@memory)")
    parser.add_argument("--json", type=Path, default=None, help="write the record here too")
    parser.add_argument("--compare", default=None, help="entries: none,compile,none@model-offload")
    parser.add_argument("--entry-timeout-s", type=float, default=600.0)
    parser.add_argument("--table", type=Path, default=None, help="print the table of a folder")
    parser.add_argument("--env", type=Path, default=None, help="write the environment JSON")
    return parser


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        model=args.model,
        size_px=args.size,
        steps=args.steps,
        runs=args.runs,
        warmup=args.warmup,
        device=args.device,
        config_dir=args.config_dir,
        allow_download=args.allow_download,
        acceleration=args.acceleration,
        memory=args.memory,
        cache_threshold=args.cache_threshold,
        memory_limit_gb=args.memory_limit_gb,
        out_dir=args.out,
        compile_cache_dir=args.compile_cache_dir,
        entry=args.entry,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Exit code 0 when the run (or every compare entry) went through, 2 when it failed with
    a reason (written into the JSON as ``status: failed: ...``)."""
    args = _parser().parse_args(argv)
    if args.env is not None:
        _write_json(args.env, environment())
        return 0
    if args.table is not None:
        print(summarize(args.table)["table"])
        return 0
    options = options_from_args(args)
    if args.compare is not None:
        if args.out is None:
            print("error: --compare needs --out DIR", file=sys.stderr)
            return 2
        try:
            entries = parse_entries(args.compare)
            summary = run_compare(options, entries, args.out, args.entry_timeout_s)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        failed = [r for r in summary["entries"] if r.get("status") != "ok"]
        return 2 if failed else 0
    return _bench_once(options, args.json)


def _bench_once(options: BenchOptions, json_path: Path | None) -> int:
    from kontext_server.domain.errors import KontextError

    started = time.perf_counter()
    try:
        record = run_bench(options)
        code = 0
    except (KontextError, ValueError, RuntimeError, MemoryError) as exc:
        reason = f"failed: {type(exc).__name__}: {exc}".splitlines()[0]
        record = _status_record(options.name, reason, time.perf_counter() - started)
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    if json_path is not None:
        _write_json(json_path, record)
    if code == 0:
        print(json.dumps(record, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
