"""``kontext-server bench`` per preset and ``--compare`` in child processes, on the tiny model.

The compare run is real: one fresh ``python -m kontext_server.worker.bench`` process per entry,
the tiny diffusers pipeline at 64 px, 2 steps. ``fp8`` fails on a CPU (a clear error, the other
entries still run). Compile is the slow part (~20-40 s per compiling entry on 2 cores): one
module-wide compare run serves every test that reads its files.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_server.worker.bench import (
    BenchOptions,
    CompareEntry,
    deviation,
    format_table,
    parse_entries,
    run_bench,
)

pytestmark = pytest.mark.timeout(400)

COMMON = ("--model", "tiny", "--device", "cpu", "--size", "64", "--steps", "2")


def _env() -> dict[str, str]:
    # one compile thread: no worker pool to start on a 2-core machine (faster here)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}


def _run(*args: str, cwd: Path, timeout: float = 360) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env=_env(),
    )


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("compare")
    completed = _run(
        "-m", "kontext_server", "bench", *COMMON,
        "--compare", "none,fp8,cache@group-offload",
        "--entry-timeout-s", "240", "--out", str(out),
        cwd=out,
    )  # fmt: skip
    # exit 2: one entry (fp8 on a CPU) failed; the table is printed all the same
    assert completed.returncode == 2, completed.stderr
    return out, completed.stdout


def _record(out: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    return data


# --- the compare run --------------------------------------------------------------------------


def test_each_entry_has_its_json_and_artifacts(compared: tuple[Path, str]) -> None:
    out, _ = compared
    for name in ("none", "fp8", "cache_group-offload"):
        assert (out / f"{name}.json").is_file(), name
    for name in ("none", "cache_group-offload"):
        record = _record(out, name)
        assert record["status"] == "ok"
        assert (out / record["files"]["latents"]).is_file()
        assert Image.open(out / record["files"]["image"]).size == (64, 64)
    assert (out / "table.txt").read_text().startswith("| entry |")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["order"] == ["none", "fp8", "cache_group-offload"]


def test_the_none_record_has_every_number(compared: tuple[Path, str]) -> None:
    record = _record(compared[0], "none")
    assert record["acceleration"] == "none"
    assert record["memory"] == "resident"
    assert record["levers"] == []
    assert record["device"] == "cpu"
    assert record["random_weights"] is True
    assert record["runs"] == 3
    assert record["load_s"] > 0
    assert record["first_edit_s"] > 0
    assert record["cold_start_s"] == pytest.approx(record["load_s"] + record["first_edit_s"])
    assert 0 < record["step_ms"]["min"] <= record["step_ms"]["median"]
    assert 0 < record["end_to_end_s"]["min"] <= record["end_to_end_s"]["median"]
    assert record["peak_memory_kind"] == "process_peak_rss"
    assert record["peak_memory_bytes"] > 10 * 1024 * 1024
    assert record["memory_limit"] is None
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["diffusers"]
    prompt = record["prompt_cache"]
    assert prompt["miss_s"] > prompt["hit_s"] > 0
    assert prompt["saving_s"] == pytest.approx(prompt["miss_s"] - prompt["hit_s"])
    assert prompt["hits"] >= 5
    latents = torch.load(compared[0] / record["files"]["latents"])
    assert latents.ndim == 3
    assert latents.shape[0] == 1


def test_compiling_entries_say_what_they_applied(compared: tuple[Path, str]) -> None:
    out, _ = compared
    cached = _record(out, "cache_group-offload")
    assert "regional compilation of the repeated transformer blocks" in cached["levers"]
    assert "fused QKV projections" in cached["levers"]
    cache_dir = out / "cache_group-offload" / "compile-cache"
    assert cached["compile_cache_dir"] == str(cache_dir)
    assert any(cache_dir.rglob("*"))
    assert cached["memory"] == "group-offload"
    assert cached["cache_threshold"] == pytest.approx(0.12)
    assert any(lever.startswith("first block cache") for lever in cached["levers"])
    assert any(lever.startswith("group offload") for lever in cached["levers"])


def test_fp8_on_a_cpu_fails_clearly_and_the_rest_still_run(compared: tuple[Path, str]) -> None:
    out, stdout = compared
    failed = _record(out, "fp8")
    assert failed["status"].startswith("failed: ModelLoadError: acceleration fp8 needs a CUDA GPU")
    assert "bench cache@group-offload: ok" in stdout


def test_the_table_has_the_deviation_from_none(compared: tuple[Path, str]) -> None:
    out, stdout = compared
    rows = {line.split(" | ")[0].strip("| "): line for line in stdout.splitlines()}
    assert "rel L2 | PSNR dB | SSIM" in rows["entry"]
    # none against itself: zero deviation, PSNR infinite
    assert "| 0 | inf | 1.0000 | ok |" in rows["none"]
    assert "failed: ModelLoadError" in rows["fp8"]
    summary = json.loads((out / "summary.json").read_text())
    found = {record["entry"]: record.get("deviation") for record in summary["entries"]}
    assert found["none"]["relative_l2"] == 0
    assert math.isinf(found["none"]["psnr_db"])
    # the deviation columns are computed (the compiled entry on float32: rounding only; the
    # cache skipping steps is tested in test_acceleration, not here)
    cached = found["cache@group-offload"]
    assert 0 <= cached["relative_l2"] < 1e-4
    assert cached["ssim"] > 0.99
    assert "RANDOM" in stdout
    assert "not their deviation on real weights".upper() in stdout.upper()


# --- failures and timeouts ------------------------------------------------------------------------


def test_an_entry_that_overruns_is_killed_and_the_next_still_runs(tmp_path: Path) -> None:
    completed = _run(
        "-m", "kontext_server.worker.bench", *COMMON,
        "--compare", "none,compile", "--entry-timeout-s", "1", "--out", str(tmp_path),
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2
    for name in ("none", "compile"):
        record = _record(tmp_path, name)
        assert record["status"] == "timed out after 1 s", record
        assert record["wall_s"] < 30
    assert "bench compile: timed out after 1 s" in completed.stdout
    assert "| none |" in completed.stdout
    assert "No successful `none` entry" in completed.stdout


def test_a_memory_cap_on_the_cpu_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--memory-limit-gb caps CUDA memory; this run is on cpu"):
        run_bench(BenchOptions(device="cpu", size_px=64, steps=1, memory_limit_gb=16))


def test_compare_needs_three_runs_and_valid_entries(tmp_path: Path) -> None:
    completed = _run(
        "-m", "kontext_server", "bench", *COMMON, "--runs", "2", "--compare", "none",
        "--out", str(tmp_path), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2
    assert "--runs >= 3" in completed.stderr
    with pytest.raises(ValueError, match="preset 'turbo'"):
        parse_entries("none,turbo")
    with pytest.raises(ValueError, match="given twice"):
        parse_entries("none, none@resident")
    assert parse_entries("none, compile, none@Model-Offload, cache@fp8-storage+group-offload") == [
        CompareEntry("none"),
        CompareEntry("compile"),
        CompareEntry("none", "model-offload"),
        CompareEntry("cache", "fp8-storage+group-offload"),
    ]


def test_the_engine_modules_need_no_api_packages() -> None:
    # The GPU machine has torch + diffusers + pydantic(-settings): nothing of the API.
    code = (
        "import sys\n"
        "for name in ('fastapi', 'uvicorn', 'httpx', 'typer', 'starlette'):\n"
        "    sys.modules[name] = None\n"
        "import kontext_server.worker.bench, kontext_server.worker.pipeline\n"
        "import kontext_server.worker.acceleration, kontext_server.domain.errors\n"
        "import kontext_server.domain.editing\n"
    )
    completed = _run("-c", code, cwd=Path.cwd(), timeout=120)
    assert completed.returncode == 0, completed.stderr


# --- deviation and table, on synthetic files ------------------------------------------------------


def _artifacts(
    folder: Path, name: str, latents: torch.Tensor, pixels: np.ndarray
) -> dict[str, Any]:
    (folder / name).mkdir()
    torch.save(latents, folder / name / "latents.pt")
    Image.fromarray(pixels).save(folder / name / "output.png")
    return {"files": {"latents": f"{name}/latents.pt", "image": f"{name}/output.png"}}


def test_deviation_measures_latents_and_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    latents = torch.randn(1, 16, 64)
    pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    base = _artifacts(tmp_path, "base", latents, pixels)
    same = _artifacts(tmp_path, "same", latents.clone(), pixels.copy())
    noisy = pixels.astype(np.int16) + rng.integers(-8, 9, pixels.shape)
    moved = _artifacts(tmp_path, "moved", latents * 1.01, np.clip(noisy, 0, 255).astype(np.uint8))
    identical = deviation(base, same, tmp_path)
    assert identical["relative_l2"] == 0
    assert math.isinf(identical["psnr_db"])
    assert identical["ssim"] == 1.0
    found = deviation(base, moved, tmp_path)
    assert found["relative_l2"] == pytest.approx(0.01, rel=1e-4)
    assert 25 < found["psnr_db"] < 50
    assert 0 < found["ssim"] < 1
    missing = deviation(base, {"files": {}}, tmp_path)
    assert missing["relative_l2"] is None
    assert "missing" in missing["note"]


def test_the_table_marks_random_weights_and_failures() -> None:
    records = [
        {"entry": "none", "status": "ok", "random_weights": False, "load_s": 1.0},
        {"entry": "fp8", "status": "timed out after 170 s"},
    ]
    table = format_table(records)
    assert "| fp8 | – |" in table
    assert "timed out after 170 s |" in table
    assert "RANDOM" not in table
    records[0]["random_weights"] = True
    assert "RANDOM" in format_table(records)
