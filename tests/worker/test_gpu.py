"""On a CUDA machine: the full-size random model builds in bf16 and the bench measures it."""

from __future__ import annotations

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
