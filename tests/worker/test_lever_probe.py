"""benchmarks/lever_probe.py runs (tiny model, CPU) so that it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_lever_probe_reports_each_lever(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "lever_probe.py"),
            str(out),
            *("--model", "tiny", "--device", "cpu", "--size", "64", "--steps", "3"),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    found = json.loads(out.read_text())
    assert found["eager_again"] == 0.0  # eager is deterministic
    assert found["fused_qkv"] < 1e-5  # float32 on the CPU: the same arithmetic
    assert found["prompt_one_character_longer"] > 0  # a real change moves the result
    assert "cudnn_attention" not in found  # CUDA only
