"""Which lever moves the output? Eager edits of one model, one lever at a time.

    PYTHONPATH=src python benchmarks/lever_probe.py OUT.json [--model dummy-full] \
        [--device cuda] [--size 512] [--steps 28]

Runs the same edit (seed 0, a random reference from a fixed seed) eagerly: twice as it is
(determinism), with cuDNN attention (CUDA only), with fused QKV projections, and with a prompt
one character longer (how far an unrelated small change moves the result), and prints the
relative L2 of each run's final latents against the first. Used to find where the `compile`
preset's deviation on dummy-full comes from (docs/performance.md#engine-figures).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kontext_server.domain.editing import EditRequest
from kontext_server.worker.pipeline import KontextPipeline

PROMPT = "Change the car's color to red"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="dummy-full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=28)
    args = parser.parse_args()

    engine = KontextPipeline.load(args.model, device=args.device)
    engine.area_px = args.size * args.size
    engine.capture_latents = True
    pixels = np.random.default_rng(0).integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)
    reference = Image.fromarray(pixels)
    transformer = engine.pipe.transformer

    def latents(prompt: str = PROMPT) -> torch.Tensor:
        engine.edit(
            EditRequest(prompt=prompt, images=[reference], seed=0, num_inference_steps=args.steps)
        )
        assert engine.last_latents is not None
        return engine.last_latents.clone()

    started = time.perf_counter()
    first = latents()
    found: dict[str, float] = {"eager_edit_s": time.perf_counter() - started}

    def against_first(name: str, other: torch.Tensor) -> None:
        found[name] = float((other - first).norm() / first.norm())

    against_first("eager_again", latents())
    if engine.device.type == "cuda":
        transformer.set_attention_backend("_native_cudnn")
        against_first("cudnn_attention", latents())
        transformer.set_attention_backend("native")
    transformer.fuse_qkv_projections()
    against_first("fused_qkv", latents())
    transformer.unfuse_qkv_projections()
    against_first("prompt_one_character_longer", latents(PROMPT + "!"))
    args.out.write_text(json.dumps(found, indent=1))
    print(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
