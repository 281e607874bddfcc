"""Speed presets, memory modes and the prompt-embedding cache on the tiny model (CPU).

Each engine here is built from its own fresh tiny pipeline: presets change the modules they
are applied to (fused projections, compiled blocks, hooks), so nothing is shared with the
session-wide engine of the other tests. Deviations are measured on the final latents of the
same seed, input and prompt against the ``none`` preset.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_server.config import Settings
from kontext_server.domain.editing import EditRequest
from kontext_server.domain.engine_options import MemoryMode, parse_memory_mode
from kontext_server.domain.errors import ModelLoadError
from kontext_server.worker.acceleration import Acceleration, step_cache_threshold
from kontext_server.worker.pipeline import KontextPipeline, PromptCache

pytestmark = pytest.mark.timeout(240)

AREA_PX = 96 * 96
STEPS = 4


def reference_image(seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def request(**overrides: Any) -> EditRequest:
    fields: dict[str, Any] = {
        "prompt": "turn the sky green",
        "images": [reference_image()],
        "seed": 3,
        "num_inference_steps": STEPS,
        "output_format": "png",
    }
    return EditRequest(**(fields | overrides))


def build(
    preset: str = "none", memory: str = "resident", tmp: Path | None = None, **extra: Any
) -> KontextPipeline:
    engine = KontextPipeline.load(
        "tiny",
        device="cpu",
        acceleration=Acceleration(
            preset=preset,  # type: ignore[arg-type]
            memory=parse_memory_mode(memory),
            compile_cache_dir=tmp,
            **extra,
        ),
    )
    engine.area_px = AREA_PX
    engine.capture_latents = True
    return engine


def final_latents(engine: KontextPipeline, edit: EditRequest | None = None) -> torch.Tensor:
    engine.edit(edit or request())
    assert engine.last_latents is not None
    return engine.last_latents


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def reference_latents() -> torch.Tensor:
    engine = build("none")
    try:
        return final_latents(engine)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def cache_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KontextPipeline]:
    """Compile + step cache with a threshold that makes the cache skip on random weights."""
    engine = build("cache", tmp=tmp_path_factory.mktemp("compile-cache"), cache_threshold=1.0)
    yield engine
    engine.close()


# --- names and settings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("resident", MemoryMode()),
        ("fp8-storage", MemoryMode(storage="fp8-storage")),
        ("model-offload", MemoryMode(offload="model-offload")),
        ("NF4 + group-offload", MemoryMode(storage="nf4", offload="group-offload")),
    ],
)
def test_memory_modes_parse(text: str, expected: MemoryMode) -> None:
    assert parse_memory_mode(text) == expected


@pytest.mark.parametrize(
    "text", ["", "fast", "fp8-storage+nf4", "model-offload+group-offload", "resident+nf4"]
)
def test_a_bad_memory_mode_says_what_is_allowed(text: str) -> None:
    with pytest.raises(ValueError, match="allowed: resident, or one storage"):
        parse_memory_mode(text)


def test_settings_check_the_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KONTEXT_ACCELERATION", "fp8-cache")
    monkeypatch.setenv("KONTEXT_MEMORY", "model-offload+fp8-storage")
    settings = Settings()
    assert settings.acceleration == "fp8-cache"
    assert settings.memory == "fp8-storage+model-offload"
    with pytest.raises(ValueError, match="acceleration"):
        Settings(acceleration="turbo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache_threshold"):
        Settings(cache_threshold=0)


def test_fp8_preset_and_fp8_storage_do_not_combine() -> None:
    with pytest.raises(ValueError, match="pick one"):
        Acceleration(preset="fp8", memory=MemoryMode(storage="fp8-storage"))


def test_fal_acceleration_moves_only_the_step_cache() -> None:
    cached = Acceleration(preset="cache", cache_threshold=0.1)
    assert step_cache_threshold(cached, None) == 0.1
    assert step_cache_threshold(cached, "regular") == 0.1
    assert step_cache_threshold(cached, "high") == pytest.approx(0.2)
    assert step_cache_threshold(cached, "none") == 0.0
    assert step_cache_threshold(Acceleration(preset="compile"), "high") == 0.0


# --- presets on the real pipeline ---------------------------------------------------------------


def test_compile_preset_stays_within_float_rounding_and_keeps_its_kernels(
    reference_latents: torch.Tensor, tmp_path: Path
) -> None:
    engine = build("compile", tmp=tmp_path)
    try:
        assert "regional compilation of the repeated transformer blocks" in engine.applied.levers
        assert "fused QKV projections" in engine.applied.levers
        latents = final_latents(engine)
        again = final_latents(engine)
    finally:
        engine.close()
    assert latents.shape == reference_latents.shape
    # Same arithmetic, other kernels: float32 rounding only.
    assert relative_l2(latents, reference_latents) < 1e-4
    assert torch.equal(latents, again)  # a compiled engine is deterministic
    # Inductor wrote its kernels where a restarted worker looks for them.
    assert any((tmp_path / "inductor").rglob("*.py"))


@pytest.mark.parametrize("memory", ["group-offload", "fp8-storage"])
def test_compile_runs_with_memory_modes_that_hook_the_blocks(
    memory: str, reference_latents: torch.Tensor, tmp_path: Path
) -> None:
    # Both modes put hooks on the compiled blocks (a compiler-disabled onload, a weight swap):
    # the blocks compile with graph breaks there instead of failing to compile whole.
    engine = build("compile", memory, tmp=tmp_path)
    try:
        latents = final_latents(engine)
    finally:
        engine.close()
    assert latents.shape == reference_latents.shape
    bound = 1e-4 if memory == "group-offload" else 0.1  # fp8 storage rounds the weights
    assert relative_l2(latents, reference_latents) < bound


def test_fusion_leaves_no_unused_projection_weights() -> None:
    plain = build("none")
    fused = build("compile")
    try:
        count = sum(p.numel() for p in plain.pipe.transformer.parameters())
        fused_count = sum(p.numel() for p in fused.pipe.transformer.parameters())
        attention = fused.pipe.transformer.transformer_blocks[0].attn
    finally:
        plain.close()
        fused.close()
    assert fused_count == count  # the same weights, concatenated: nothing kept twice
    assert not hasattr(attention, "to_q") and not hasattr(attention, "add_q_proj")
    assert attention.to_qkv is not None and attention.to_added_qkv is not None


def test_step_cache_skips_work_and_fal_none_turns_it_off(
    cache_engine: KontextPipeline, reference_latents: torch.Tensor
) -> None:
    assert any("first block cache" in lever for lever in cache_engine.applied.levers)
    cached = final_latents(cache_engine, request(acceleration="regular"))
    exact = final_latents(cache_engine, request(acceleration="none"))
    assert cached.shape == reference_latents.shape
    # "none": every step computes, the result of the preset without caching.
    assert relative_l2(exact, reference_latents) < 1e-4
    # the cache reused residuals: the result moved, by a bounded amount
    deviation = relative_l2(cached, reference_latents)
    assert 1e-4 < deviation < 1.0


def test_step_cache_state_does_not_leak_between_edits(cache_engine: KontextPipeline) -> None:
    first = final_latents(cache_engine, request(acceleration="regular"))
    final_latents(cache_engine, request(prompt="something else", seed=9))
    again = final_latents(cache_engine, request(acceleration="regular"))
    assert torch.equal(first, again)


def test_fp8_weight_storage_deviates_by_a_bounded_amount(
    reference_latents: torch.Tensor,
) -> None:
    engine = build("none", "fp8-storage")
    try:
        latents = final_latents(engine)
        transformer_weight = engine.pipe.transformer.transformer_blocks[0].attn.to_q.weight
        t5_weight = engine.pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight
    finally:
        engine.close()
    assert transformer_weight.dtype == torch.float8_e4m3fn
    assert t5_weight.dtype == torch.float8_e4m3fn
    assert latents.shape == reference_latents.shape
    assert 0 < relative_l2(latents, reference_latents) < 0.1


@pytest.mark.parametrize("memory", ["model-offload", "group-offload"])
def test_offload_modes_are_bit_identical(memory: str, reference_latents: torch.Tensor) -> None:
    # On a CPU-only machine the offload target is the CPU itself: the hooks run (and are
    # tested), the arithmetic is the same.
    engine = build("none", memory)
    try:
        latents = final_latents(engine)
    finally:
        engine.close()
    assert torch.equal(latents, reference_latents)


@pytest.mark.parametrize("preset", ["fp8", "fp8-cache"])
def test_fp8_on_a_cpu_is_a_clear_error(preset: str) -> None:
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        build(preset)


def test_nf4_needs_real_weights_and_cuda() -> None:
    with pytest.raises(ModelLoadError, match="random weights: use fp8-storage"):
        build("none", "nf4")


# --- prompt-embedding cache ---------------------------------------------------------------


def test_a_repeated_prompt_skips_the_text_encoders(reference_latents: torch.Tensor) -> None:
    engine = build("none")
    calls = []
    engine.pipe.text_encoder_2.register_forward_hook(lambda *args: calls.append(1))
    try:
        first = final_latents(engine)
        second = final_latents(engine)
    finally:
        engine.close()
    assert len(calls) == 1
    assert (engine.prompt_cache.hits, engine.prompt_cache.misses) == (1, 1)
    assert torch.equal(first, reference_latents)
    assert torch.equal(second, reference_latents)


def test_prompt_cache_keeps_the_most_recent_prompts() -> None:
    cache = PromptCache(2)
    for prompt in ("a", "b"):
        cache.put(prompt, {"prompt_embeds": torch.zeros(1)})
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", {"prompt_embeds": torch.zeros(1)})
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2
    off = PromptCache(0)
    off.put("a", {"prompt_embeds": torch.zeros(1)})
    assert off.get("a") is None


# --- warm-up ----------------------------------------------------------------------------------


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("preset", ["compile", "cache"])
def test_after_warmup_requests_compile_nothing_new(preset: str, tmp_path: Path) -> None:
    engine = build(preset, tmp=tmp_path)
    try:
        before = unique_graphs()
        seconds = engine.warmup()
        compiled = unique_graphs()
        assert seconds > 0 and compiled > before  # the warm-up compiled
        assert len(engine.prompt_cache) == 0  # the warm-up prompt is not kept
        assert (engine.prompt_cache.hits, engine.prompt_cache.misses) == (0, 0)
        results = [
            engine.edit(request(aspect_ratio="16:9", acceleration="high")),
            engine.edit(request(images=[reference_image().resize((90, 60))], acceleration="none")),
            engine.edit(request(acceleration="regular")),
        ]
    finally:
        engine.close()
    assert unique_graphs() == compiled  # no request paid for a compile
    assert results[0].images[0].width > results[0].images[0].height


def test_nf4_quantizes_the_transformer_and_t5_while_real_weights_load() -> None:
    from kontext_server.worker.models import _nf4_config

    config = _nf4_config(torch.bfloat16)
    assert config.quant_backend == "bitsandbytes_4bit"
    assert config.components_to_quantize == ["transformer", "text_encoder_2"]
    assert config.quant_kwargs["bnb_4bit_quant_type"] == "nf4"
    assert config.quant_kwargs["bnb_4bit_compute_dtype"] == torch.bfloat16


def test_nf4_of_a_single_file_says_what_to_use(tmp_path: Path) -> None:
    transformer_file = tmp_path / "flux1-kontext-dev.safetensors"
    transformer_file.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a single file: give its diffusers folder"):
        KontextPipeline.load(
            str(transformer_file),
            device="cpu",
            acceleration=Acceleration(memory=parse_memory_mode("nf4")),
        )
