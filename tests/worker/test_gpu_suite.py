"""``benchmarks/gpu_suite.sh`` dry-run on the CPU with the tiny model, so that it cannot rot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.timeout(400),
    pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout"),
]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_suite.sh"
CUDA_ONLY = ("fp8", "fp8-storage-24gb", "group-offload-16gb", "fp8-cache")
ON_CPU = ("none", "compile", "cache", "compile-restart", "model-offload")


def test_the_gpu_suite_runs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "suite"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "TORCHINDUCTOR_COMPILE_THREADS": "1",  # no compile worker pool on 2 cores
    }
    completed = subprocess.run(
        [
            "bash", str(SCRIPT), str(out),
            "--model", "tiny", "--device", "cpu", "--size", "64", "--steps", "2",
            "--budget-s", "240",
        ],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    env_record = json.loads((out / "env.json").read_text())
    assert env_record["status"] == "ok"
    assert env_record["cuda_available"] is False
    assert env_record["versions"]["torch"]
    records = {name: json.loads((out / f"{name}.json").read_text()) for name in CUDA_ONLY + ON_CPU}
    for name in CUDA_ONLY:
        assert records[name]["status"] == "skipped: needs CUDA (device cpu)", name
    for name in ON_CPU:
        assert records[name]["status"] == "ok", (name, (out / f"{name}.log").read_text()[-2000:])
        assert records[name]["first_edit_s"] > 0
    # the restart reuses compile's cache folder: its first edit does not compile from scratch
    restart, compiled = records["compile-restart"], records["compile"]
    assert restart["compile_cache_dir"] == compiled["compile_cache_dir"]
    assert restart["first_edit_s"] < compiled["first_edit_s"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["order"] == [
        "none", "compile", "compile-restart", "cache",
        "fp8-storage-24gb", "group-offload-16gb", "model-offload", "fp8", "fp8-cache",
    ]  # fmt: skip
    assert len(summary["entries"]) == 9
    assert "| compile-restart |" in completed.stdout
    assert "skipped: needs CUDA (device cpu)" in (out / "table.txt").read_text()


def test_a_stage_that_does_not_fit_the_budget_is_skipped(tmp_path: Path) -> None:
    out = tmp_path / "suite"
    completed = subprocess.run(
        ["bash", str(SCRIPT), str(out), "--model", "tiny", "--device", "cpu", "--budget-s", "30"],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    for name in ON_CPU:
        status = json.loads((out / f"{name}.json").read_text())["status"]
        assert status.startswith("skipped: "), (name, status)
        assert "budget left" in status
    assert (out / "summary.json").is_file()
