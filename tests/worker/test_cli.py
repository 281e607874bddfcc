"""``kontext-server edit`` and ``bench`` as a new user runs them: real subprocesses."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kontext_server.domain.errors import InputError


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kontext_server", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=cwd,
        env=env,
    )


def _png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_edit_writes_files_and_prints_json_summary(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png(80, 60, (200, 30, 30)))
    completed = _cli(
        "edit", "--model", "tiny", "--device", "cpu",
        "--image", "a.png", "--prompt", "make it blue",
        "--seed", "5", "--num-images", "2", "--steps", "1", "--output-format", "png",
        "--out", "out",
        cwd=tmp_path,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    assert summary["seed"] == 5
    assert summary["random_weights"] is True
    assert len(summary["files"]) == 2
    for entry in summary["files"]:
        with Image.open(tmp_path / entry["path"]) as image:
            assert image.format == "PNG"
            assert image.size == (entry["width"], entry["height"]) == (1184, 880)
    assert summary["timings"]["total"] > 0
    assert "denoising" in completed.stderr  # the progress bar
    assert "RANDOM weights" in completed.stderr


def test_image_sources_may_be_files_and_data_uris(tmp_path: Path) -> None:
    from kontext_server.cli.edit import read_image_source
    from kontext_server.config import Settings

    settings = Settings(max_image_bytes=10_000)
    (tmp_path / "a.png").write_bytes(_png(80, 60, (200, 30, 30)))
    data_uri = "data:image/png;base64," + base64.b64encode(_png(60, 80, (0, 0, 200))).decode()
    assert read_image_source(str(tmp_path / "a.png"), settings).size == (80, 60)
    assert read_image_source(data_uri, settings).getpixel((1, 1)) == (0, 0, 200)
    with pytest.raises(InputError, match="cannot read image file"):
        read_image_source(str(tmp_path / "missing.png"), settings)
    (tmp_path / "big.png").write_bytes(b"x" * 10_001)
    with pytest.raises(InputError, match="at most 10,000 are allowed"):
        read_image_source(str(tmp_path / "big.png"), settings)


def test_edit_with_unreadable_image_fails_with_clear_message(tmp_path: Path) -> None:
    (tmp_path / "a.tiff").write_bytes(b"II*\x00garbage")
    completed = _cli(
        "edit", "--model", "tiny", "--image", "a.tiff", "--prompt", "x", "--out", "out",
        cwd=tmp_path,
    )  # fmt: skip
    assert completed.returncode == 2
    assert "not a JPEG, PNG, WebP, GIF, AVIF or BMP image" in completed.stderr
    assert not (tmp_path / "out").exists()


def test_bench_prints_json_numbers(tmp_path: Path) -> None:
    completed = _cli(
        "bench", "--model", "tiny", "--device", "cpu",
        "--size", "128", "--steps", "2", "--runs", "2", "--warmup", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    numbers = json.loads(completed.stdout)
    assert numbers["device"] == "cpu"
    assert numbers["dtype"] == "float32"
    assert numbers["load_s"] > 0
    assert 0 < numbers["step_ms"]["min"] <= numbers["step_ms"]["median"]
    assert 0 < numbers["end_to_end_s"]["min"] <= numbers["end_to_end_s"]["median"]
    assert numbers["peak_memory_bytes"] > 10 * 1024 * 1024
