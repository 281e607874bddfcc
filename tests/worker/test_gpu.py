"""On a CUDA machine: the full-size random model builds in bf16 and the bench measures it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kontext_server.worker.bench import BenchOptions, run_bench

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_dummy_full_bench_runs_in_bf16_on_the_gpu() -> None:
    numbers = run_bench(BenchOptions(model="dummy-full", size_px=512, steps=3, runs=1, warmup=1))
    assert numbers["device"].startswith("cuda")
    assert numbers["dtype"] == "bfloat16"
    assert numbers["random_weights"] is True
    assert numbers["step_ms"]["min"] > 0
    assert numbers["peak_memory_bytes"] > 20 * 1024**3  # ~24 GB of bf16 transformer alone


def _tiny_on_cuda(preset: str, memory: str = "resident") -> Any:
    from kontext_server.domain.engine_options import parse_memory_mode
    from kontext_server.worker.acceleration import Acceleration
    from kontext_server.worker.pipeline import KontextPipeline

    engine = KontextPipeline.load(
        "tiny",
        device="cuda",
        acceleration=Acceleration(preset=preset, memory=parse_memory_mode(memory)),
    )
    engine.area_px = 256 * 256
    engine.capture_latents = True
    return engine


def _latents(engine: Any) -> torch.Tensor:
    from PIL import Image

    from kontext_server.domain.editing import EditRequest

    engine.edit(
        EditRequest(
            prompt="gpu",
            images=[Image.new("RGB", (256, 256), (10, 200, 30))],
            seed=1,
            num_inference_steps=4,
        )
    )
    latents: torch.Tensor = engine.last_latents
    return latents


def test_compile_on_cuda_uses_cudnn_attention_and_stays_close() -> None:
    reference = _latents(_tiny_on_cuda("none"))
    engine = _tiny_on_cuda("compile")
    assert engine.applied.attention_backend in ("_native_cudnn", "_native_flash")
    latents = _latents(engine)
    assert latents.shape == reference.shape
    assert float((latents - reference).norm() / reference.norm()) < 0.05  # bf16 kernels


def test_fp8_preset_quantizes_the_blocks_and_runs() -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    pytest.importorskip("torchao")
    engine = _tiny_on_cuda("fp8")
    weight = engine.pipe.transformer.transformer_blocks[0].attn.to_out[0].weight
    assert "Float8" in type(weight).__name__
    assert torch.isfinite(_latents(engine)).all()
