"""The edit engine on the real diffusers code path with the tiny random model (CPU)."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from kontext_server.domain import sizing
from kontext_server.domain.editing import EditRequest
from kontext_server.domain.errors import EditCancelled, InputError
from kontext_server.worker.pipeline import KontextPipeline


def make_noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _pixels(data: bytes) -> np.ndarray:  # type: ignore[type-arg]
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_single_reference_edit_equals_stock_diffusers(
    engine: KontextPipeline, tiny_diffusers_pipe: Any
) -> None:
    reference = make_noise_image(120, 90)
    request = EditRequest(
        prompt="make it blue",
        images=[reference],
        seed=7,
        num_inference_steps=2,
        output_format="png",
    )
    result = engine.edit(request)

    stock = FluxKontextPipeline(**tiny_diffusers_pipe.components)
    stock.set_progress_bar_config(disable=True)
    expected = stock(
        image=reference,
        prompt="make it blue",
        num_inference_steps=2,
        guidance_scale=3.5,
        height=880,
        width=1184,
        max_area=1184 * 880,
        generator=torch.Generator().manual_seed(7),
    ).images[0]
    assert (result.images[0].width, result.images[0].height) == (1184, 880)
    assert np.array_equal(_pixels(result.images[0].data), np.asarray(expected))


@pytest.mark.parametrize(
    ("input_size", "aspect_ratio"),
    [((1920, 1080), None), ((64, 64), "21:9")],
)
def test_output_size_follows_bucket_rule(
    engine: KontextPipeline, input_size: tuple[int, int], aspect_ratio: str | None
) -> None:
    request = EditRequest(
        prompt="x",
        images=[make_noise_image(*input_size)],
        seed=1,
        aspect_ratio=aspect_ratio,
        num_inference_steps=1,
    )
    image = engine.edit(request).images[0]
    expected = sizing.output_size(*input_size, aspect_ratio)
    assert (image.width, image.height) == expected
    assert Image.open(io.BytesIO(image.data)).size == expected


def _run(engine: KontextPipeline, **overrides: Any) -> Any:
    """A 2-step PNG edit of a 96x64 noise picture, seed 42, with ``overrides``."""
    fields: dict[str, Any] = {
        "prompt": "turn the cat into a dog",
        "images": [make_noise_image(96, 64)],
        "seed": 42,
        "num_inference_steps": 2,
        "output_format": "png",
    }
    fields.update(overrides)
    return engine.edit(EditRequest(**fields))


def test_same_request_and_seed_give_byte_identical_files(small_engine: KontextPipeline) -> None:
    first = _run(small_engine, num_images=2)
    second = _run(small_engine, num_images=2)
    assert [image.data for image in first.images] == [image.data for image in second.images]
    assert first.images[0].data != first.images[1].data


def test_image_i_does_not_depend_on_num_images(small_engine: KontextPipeline) -> None:
    three = _run(small_engine, num_images=3, output_format="jpeg")
    assert three.seed == 42
    assert three.images[0].data == _run(small_engine, output_format="jpeg").images[0].data
    assert three.images[2].data == _run(small_engine, seed=44, output_format="jpeg").images[0].data


def test_missing_seed_is_drawn_and_returned(small_engine: KontextPipeline) -> None:
    drawn = _run(small_engine, seed=None)
    assert 0 <= drawn.seed < 2**53
    assert _run(small_engine, seed=drawn.seed).images[0].data == drawn.images[0].data


def test_progress_reports_every_step_of_every_image(small_engine: KontextPipeline) -> None:
    steps: list[tuple[int, int]] = []
    small_engine.edit(
        EditRequest(
            prompt="x",
            images=[make_noise_image(64, 64)],
            seed=1,
            num_images=2,
            num_inference_steps=3,
        ),
        on_step=lambda step, total: steps.append((step, total)),
    )
    assert steps == [(step, 6) for step in range(1, 7)]


class _CountingDecode:
    """Wraps the VAE's decode to count calls (a hand-written spy)."""

    def __init__(self, decode: Any) -> None:
        self.decode = decode
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.decode(*args, **kwargs)


def test_cancel_stops_within_one_step_and_decodes_nothing(
    small_engine: KontextPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae = small_engine.pipe.vae
    counting = _CountingDecode(vae.decode)
    monkeypatch.setattr(vae, "decode", counting)
    steps: list[int] = []
    with pytest.raises(EditCancelled):
        small_engine.edit(
            EditRequest(
                prompt="x", images=[make_noise_image(64, 64)], seed=1, num_inference_steps=10
            ),
            on_step=lambda step, total: steps.append(step),
            should_cancel=lambda: len(steps) >= 2,
        )
    assert steps == [1, 2]
    assert counting.calls == 0
    _run(small_engine)  # the engine still works afterwards, and decodes again
    assert counting.calls == 1


def test_random_weights_are_flagged_in_result_and_log(
    tiny_diffusers_pipe: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        pipeline = KontextPipeline(tiny_diffusers_pipe, random_weights=True, model_name="tiny")
    pipeline.close()
    assert "RANDOM weights" in caplog.text
    assert pipeline.default_steps == 4
    assert KontextPipeline(tiny_diffusers_pipe, random_weights=False).default_steps == 28
    assert (
        KontextPipeline(tiny_diffusers_pipe, random_weights=True, default_steps=9).default_steps
        == 9
    )


def test_result_carries_timings_and_random_weights(small_engine: KontextPipeline) -> None:
    result = _run(small_engine, output_format="jpeg")
    assert result.random_weights is True
    assert result.images[0].content_type == "image/jpeg"
    assert result.images[0].data[:2] == b"\xff\xd8"
    for key in ("prepare", "inference", "encode", "total", "step_ms"):
        assert result.timings[key] >= 0
    assert result.timings["total"] >= result.timings["inference"] > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"images": [], "match_input_size": True}, "match_input needs an input image"),
        ({"match_input_size": True, "aspect_ratio": "1:1"}, "give one"),
        ({"num_images": 5}, "allowed: 1 to 4"),
        ({"num_images": 0}, "allowed: 1 to 4"),
        ({"num_inference_steps": 101}, "allowed: 1 to 100"),
        ({"aspect_ratio": "5:1"}, "21:9 and 9:21"),
        ({"seed": -1}, "seed is -1"),
    ],
)
def test_requests_the_engine_cannot_run_are_input_errors(
    small_engine: KontextPipeline, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        _run(small_engine, **overrides)
