"""Every way of naming a model loads, without the hub: a tiny pipeline saved to a temp folder
comes back through the diffusers-folder, single-file (.safetensors) and GGUF paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from safetensors.torch import save_file

from kontext_server.domain.editing import EditRequest
from kontext_server.domain.errors import ModelLoadError
from kontext_server.worker.models import (
    FULL_SIZE,
    TINY,
    KontextArchitecture,
    build_random_pipeline,
    load_kontext_pipeline,
)
from kontext_server.worker.pipeline import KontextPipeline


@pytest.fixture(scope="module")
def saved_folder(tiny_diffusers_pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("kontext-tiny")
    tiny_diffusers_pipe.save_pretrained(folder)
    return folder


def _transformer_state(pipe: Any) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().float() for name, tensor in pipe.transformer.state_dict().items()}


def _edit_runs(pipe: Any, random_weights: bool) -> None:
    engine = KontextPipeline(pipe, random_weights=random_weights, area_px=64 * 64)
    try:
        result = engine.edit(
            EditRequest(prompt="x", images=[_gray()], seed=0, num_inference_steps=1)
        )
    finally:
        engine.close()
    assert result.images[0].width == 64
    assert result.random_weights is random_weights


def _gray() -> Any:
    from PIL import Image

    return Image.new("RGB", (64, 64), (128, 128, 128))


def test_tiny_builds_are_identical_and_leave_global_state_alone(tiny_diffusers_pipe: Any) -> None:
    before = torch.random.get_rng_state()
    again, random_weights = load_kontext_pipeline("tiny", device="cpu")
    assert random_weights
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.get_default_dtype() == torch.float32
    original, rebuilt = _transformer_state(tiny_diffusers_pipe), _transformer_state(again)
    assert all(torch.equal(original[name], rebuilt[name]) for name in original)
    assert not again.text_encoder_2.training


def test_diffusers_folder_loads_back_equal(tiny_diffusers_pipe: Any, saved_folder: Path) -> None:
    pipe, random_weights = load_kontext_pipeline(str(saved_folder), device="cpu")
    assert random_weights is False
    original, loaded = _transformer_state(tiny_diffusers_pipe), _transformer_state(pipe)
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[name], loaded[name]) for name in original)
    assert pipe.tokenizer_2("a cat").input_ids == tiny_diffusers_pipe.tokenizer_2("a cat").input_ids
    _edit_runs(pipe, random_weights=False)


def test_single_safetensors_transformer_loads_with_config_folder(
    tiny_diffusers_pipe: Any, saved_folder: Path, tmp_path: Path
) -> None:
    # diffusers' BFL-layout converter hard-codes the 3072-wide FLUX transformer, so a tiny
    # file keeps diffusers' key layout, which from_single_file loads as it is.
    path = tmp_path / "flux1-kontext-tiny.safetensors"
    save_file(tiny_diffusers_pipe.transformer.state_dict(), str(path))
    pipe, _ = load_kontext_pipeline(str(path), device="cpu", config_dir=saved_folder)
    original, loaded = _transformer_state(tiny_diffusers_pipe), _transformer_state(pipe)
    assert all(torch.equal(original[name], loaded[name]) for name in original)
    _edit_runs(pipe, random_weights=False)


def _write_gguf(state: dict[str, torch.Tensor], path: Path) -> int:
    """Write ``state`` as GGUF: 2-D weights whose rows fit Q8_0 blocks quantized, the rest F32.
    Returns how many tensors were quantized."""
    writer = gguf.GGUFWriter(str(path), arch="flux")
    quantized = 0
    for name, tensor in state.items():
        array = tensor.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            quantized += 1
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized


def test_gguf_transformer_loads_quantized_and_runs(
    tiny_diffusers_pipe: Any, saved_folder: Path, tmp_path: Path
) -> None:
    path = tmp_path / "flux1-kontext-tiny-Q8_0.gguf"
    assert _write_gguf(_transformer_state(tiny_diffusers_pipe), path) > 5
    pipe, _ = load_kontext_pipeline(str(path), device="cpu", config_dir=saved_folder)
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert "GGUF" in type(layer.weight).__name__
    _edit_runs(pipe, random_weights=False)


def test_hub_id_without_download_permission_says_what_to_do() -> None:
    with pytest.raises(ModelLoadError, match="KONTEXT_ALLOW_DOWNLOAD=1"):
        load_kontext_pipeline("black-forest-labs/FLUX.1-Kontext-dev", device="cpu")


def test_single_file_without_config_folder_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "flux1-kontext-dev.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ModelLoadError, match="KONTEXT_MODEL_CONFIG_DIR"):
        load_kontext_pipeline(str(path), device="cpu")


def test_missing_file_and_bad_folder_are_model_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_kontext_pipeline(str(tmp_path / "nope.gguf"), device="cpu", config_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="diffusers folder"):
        load_kontext_pipeline(str(tmp_path), device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_kontext_pipeline(str(tmp_path / "no-such-folder"), device="cpu")


def test_dummy_full_has_the_released_architecture() -> None:
    from diffusers import FluxTransformer2DModel

    assert FULL_SIZE.transformer["num_layers"] == 19
    assert FULL_SIZE.transformer["num_single_layers"] == 38
    assert (
        FULL_SIZE.transformer["num_attention_heads"] * FULL_SIZE.transformer["attention_head_dim"]
        == 3072
    )
    assert FULL_SIZE.t5["d_model"] == 4096
    with torch.device("meta"):  # counts parameters without allocating 48 GB
        transformer = FluxTransformer2DModel(**FULL_SIZE.transformer)
    parameters = sum(p.numel() for p in transformer.parameters())
    assert 11.8e9 < parameters < 12.0e9


def test_shrunk_full_size_variant_builds_and_edits_on_cpu() -> None:
    """The dummy-full build path, with widths and depths cut so that it fits a CI machine."""
    narrow = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 1}
    shrunk = KontextArchitecture(
        transformer={
            **FULL_SIZE.transformer,
            **narrow,
            "joint_attention_dim": 64,
            "pooled_projection_dim": 64,
        },
        vae={**FULL_SIZE.vae, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1},
        clip={
            **FULL_SIZE.clip,
            "hidden_size": 64,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "projection_dim": 64,
        },
        t5={**FULL_SIZE.t5, "d_model": 64, "d_ff": 64, "num_layers": 1, "num_heads": 2},
    )
    pipe = build_random_pipeline(shrunk, device=torch.device("cpu"), dtype=torch.float32)
    assert pipe.vae_scale_factor == 8
    assert TINY.vae["latent_channels"] == FULL_SIZE.vae["latent_channels"] == 16
    _edit_runs(pipe, random_weights=True)
