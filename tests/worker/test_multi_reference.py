"""Several references: ComfyUI's offset scheme, checked on the position ids themselves."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_server.domain import sizing
from kontext_server.domain.editing import EditRequest
from kontext_server.worker.pipeline import KontextPipeline


def make_noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _grid_ids(time_id: int, height: int, width: int, y_offset: int, x_offset: int) -> torch.Tensor:
    """(time, y, x) of every token of a ``height x width`` token grid, row-major."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    times = torch.full_like(ys, time_id)
    return torch.stack([times, ys + y_offset, xs + x_offset], dim=-1).reshape(-1, 3).float()


def test_reference_ids_follow_offset_scheme(small_engine: KontextPipeline) -> None:
    sizes = [(64, 48), (32, 64), (48, 48)]  # pixels -> tokens (4x3), (2x4), (3x3)
    images = [make_noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    packed = small_engine.pipe.encode_references(images, sizes)
    # First at (0,0), canvas 4x3 tokens; the tall second goes right (below would be 7 tall,
    # right 6 wide), canvas 6x4; the third goes below (right would be 9 wide, below 7 tall).
    expected_offsets = sizing.reference_offsets([(w // 16, h // 16) for w, h in sizes])
    expected = torch.cat(
        [
            _grid_ids(1, h // 16, w // 16, y_offset, x_offset)
            for (w, h), (y_offset, x_offset) in zip(sizes, expected_offsets, strict=True)
        ]
    )
    assert expected_offsets == [(0, 0), (0, 4), (4, 0)]
    assert torch.equal(packed.ids, expected)
    assert packed.latents.shape == (1, 12 + 8 + 9, 64)


class _IdsRecorder:
    """A forward pre-hook keeping the ``img_ids`` the transformer is called with."""

    def __init__(self) -> None:
        self.img_ids: list[torch.Tensor] = []
        self.tokens: list[int] = []

    def __call__(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self.img_ids.append(kwargs["img_ids"].clone())
        self.tokens.append(kwargs["hidden_states"].shape[1])


@pytest.mark.parametrize("count", [2, 3])
def test_multi_reference_edit_runs_with_target_then_offset_reference_ids(
    small_engine: KontextPipeline, count: int
) -> None:
    images = [make_noise_image(96 - 16 * i, 64 + 16 * i, seed=i) for i in range(count)]
    recorder = _IdsRecorder()
    handle = small_engine.pipe.transformer.register_forward_pre_hook(recorder, with_kwargs=True)
    try:
        result = small_engine.edit(
            EditRequest(prompt="combine them", images=images, seed=3, num_inference_steps=2)
        )
    finally:
        handle.remove()
    out_w, out_h = sizing.output_size(96, 64, area_px=small_engine.area_px)
    assert (result.images[0].width, result.images[0].height) == (out_w, out_h)

    ref_sizes = small_engine.reference_sizes(images)
    assert sum(w * h for w, h in ref_sizes) <= small_engine.multi_reference_budget_px
    target_ids = _grid_ids(0, out_h // 16, out_w // 16, 0, 0)
    offsets = sizing.reference_offsets([(w // 16, h // 16) for w, h in ref_sizes])
    reference_ids = [
        _grid_ids(1, h // 16, w // 16, y_offset, x_offset)
        for (w, h), (y_offset, x_offset) in zip(ref_sizes, offsets, strict=True)
    ]
    expected = torch.cat([target_ids, *reference_ids])
    assert len(recorder.img_ids) == 2  # one transformer call per step
    assert all(torch.equal(ids, expected) for ids in recorder.img_ids)
    assert recorder.tokens[0] == expected.shape[0]


def test_references_over_budget_are_scaled_down_together(tiny_diffusers_pipe: Any) -> None:
    engine = KontextPipeline(
        tiny_diffusers_pipe, random_weights=True, multi_reference_budget_px=2 * 1024 * 1024
    )
    try:
        sizes = engine.reference_sizes([make_noise_image(40, 30), make_noise_image(30, 40)] * 2)
    finally:
        engine.close()
    assert sum(w * h for w, h in sizes) <= 2 * 1024 * 1024
    assert sizes[0] == sizes[2]
    assert sizes[0] == (sizes[1][1], sizes[1][0])
