"""Loading a FLUX.1 Kontext diffusers pipeline from every source the operator may name.

``--model`` / ``KONTEXT_MODEL`` selects one of:

* ``tiny``: a tiny random-weight pipeline built in memory (tests, demos; outputs are noise);
* ``dummy-full``: the full FLUX.1-Kontext-dev architecture with random weights, built on the
  target device without any download (speed measurements: FLOPs do not depend on weights);
* a local diffusers folder or a Hugging Face id (``black-forest-labs/FLUX.1-Kontext-dev``);
* a single ``.safetensors`` transformer file (BFL's release) or a ``.gguf`` transformer file,
  with ``config_dir`` naming a diffusers folder that holds the rest of the pipeline.

Nothing touches the Hugging Face hub unless ``allow_download`` is true. Weights are bf16 on
CUDA and float32 on CPU. Every failure is a ``ModelLoadError`` saying what was tried and what to
do about it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from kontext_server.domain.errors import ModelLoadError
from kontext_server.worker.acceleration import MemoryMode

__all__ = [
    "FULL_SIZE",
    "KONTEXT_HF_ID",
    "TINY",
    "KontextArchitecture",
    "build_random_pipeline",
    "load_kontext_pipeline",
    "resolve_device",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)

KONTEXT_HF_ID = "black-forest-labs/FLUX.1-Kontext-dev"
_SEED = 0
_T = TypeVar("_T")

# FLUX.1-Kontext-dev's scheduler (dynamic shifting is what `mu` in diffusers' __call__ feeds).
_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


@dataclass(frozen=True)
class KontextArchitecture:
    """Constructor arguments of every model of a Kontext pipeline (random-weight builds)."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    clip: dict[str, Any]
    t5: dict[str, Any]
    clip_max_length: int = 77
    extra: dict[str, Any] = field(default_factory=dict)


# The released FLUX.1-Kontext-dev configs, written here so that dummy-full needs no download.
FULL_SIZE = KontextArchitecture(
    transformer={
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 16,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
    },
    clip={  # openai/clip-vit-large-patch14 text tower
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "projection_dim": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
    },
    t5={  # google/t5-v1_1-xxl encoder
        "vocab_size": 32128,
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.0,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
    },
)

# Tiny: 1 double + 1 single block, head dim 16, rope axes (4, 6, 6); a 4-block VAE with 16
# latent channels so that the VAE scale factor stays 8 and every size rule is the real one.
TINY = KontextArchitecture(
    transformer={
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": True,
        "axes_dims_rope": (4, 6, 6),
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (4, 8, 8, 8),
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 16,
        "norm_num_groups": 4,
        "sample_size": 32,
        "mid_block_add_attention": False,  # attention over 16k latents would cost seconds
        "scaling_factor": 1.5035,
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
    clip={
        "vocab_size": 1000,
        "hidden_size": 32,
        "intermediate_size": 37,
        "projection_dim": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "bos_token_id": 0,  # ids of the in-memory tokenizer's <|startoftext|>, <|endoftext|>
        "pad_token_id": 1,
        "eos_token_id": 1,
    },
    t5={
        "vocab_size": 1000,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 37,
        "num_layers": 1,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "dropout_rate": 0.0,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
    },
)


def resolve_device(device: str | None) -> torch.device:
    """``None``: CUDA when available, else CPU; otherwise the named device (``cuda:1``)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"device {device!r} is not a torch device; use cpu, cuda or cuda:N"
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but this torch sees no CUDA GPU")
    return resolved


def resolve_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (what the weights were trained in), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_kontext_pipeline(
    model: str,
    *,
    device: str | None = None,
    config_dir: Path | None = None,
    allow_download: bool = False,
    memory: MemoryMode | None = None,
) -> tuple[Any, bool]:
    """Load ``model`` for ``device``; return ``(pipe, random_weights)`` where ``pipe`` is a
    diffusers ``FluxKontextPipeline``.

    ``random_weights`` is true for ``tiny`` and ``dummy-full``. With an offloading ``memory``
    mode, weights read from disk stay in CPU memory (the offload hooks move them); with
    ``nf4`` they are quantized while they load. Raises ``ModelLoadError``.
    """
    memory = memory or MemoryMode()
    target = resolve_device(device)
    dtype = resolve_dtype(target)
    if target.type == "cuda" and memory != MemoryMode():
        _use_expandable_segments()
    if memory.storage == "nf4":
        _check_nf4(model, target)
    if model == "tiny":
        return build_random_pipeline(TINY, device=target, dtype=dtype, seed=_SEED), True
    if model == "dummy-full":
        # Random weights are built where they will run (a second, not minutes on the CPU),
        # also with offload or fp8 storage when the device has room for the bf16 build: the
        # hooks then move or cast them before the first edit. Seeded: every process builds
        # the same weights, so that runs can be compared.
        build_on = target if _has_room_for_full_build(target) else torch.device("cpu")
        pipe = build_random_pipeline(FULL_SIZE, device=build_on, dtype=dtype, seed=_SEED)
        if build_on != target and not memory.loads_on_cpu:
            pipe = pipe.to(target)
        return pipe, True
    path = Path(model).expanduser()
    if model.startswith((".", "/", "~")) and not path.exists():
        raise ModelLoadError(
            f"model path {path} does not exist; give a diffusers folder, a .safetensors or "
            "a .gguf file, a Hugging Face id, 'tiny' or 'dummy-full'"
        )
    quantization = _nf4_config(dtype) if memory.storage == "nf4" else None
    if path.suffix in (".safetensors", ".gguf"):
        pipe = _load_single_file(path, config_dir, allow_download=allow_download, dtype=dtype)
    else:
        pipe = _load_pretrained(
            model, allow_download=allow_download, dtype=dtype, quantization=quantization
        )
    if memory.loads_on_cpu:
        return pipe, False
    return pipe.to(target), False


def _use_expandable_segments() -> None:
    """A memory mode is for a GPU that is nearly full: let PyTorch's allocator grow segments
    instead of keeping fixed blocks, so fragmentation does not cost gigabytes (on an H200
    capped at 24 GiB, fp8-storage ran out with 2.7 GiB reserved but unused). Read by the
    allocator when it first allocates, which has not happened yet in a worker; an operator's
    own PYTORCH_CUDA_ALLOC_CONF wins."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


_FULL_BUILD_BYTES = 40 * 1024**3  # dummy-full in bf16 (~34 GB) plus room to run


def _has_room_for_full_build(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return free_bytes >= _FULL_BUILD_BYTES


def _check_nf4(model: str, device: torch.device) -> None:
    if model in ("tiny", "dummy-full"):
        raise ModelLoadError(
            f"memory mode nf4 quantizes weights while they load from disk; {model!r} is built "
            "in memory with random weights: use fp8-storage, or a real model folder"
        )
    if Path(model).suffix in (".safetensors", ".gguf"):
        raise ModelLoadError(
            f"memory mode nf4 quantizes a diffusers folder or Hugging Face model while it "
            f"loads; {Path(model).name} is a single file: give its diffusers folder, or use "
            "fp8-storage"
        )
    if device.type != "cuda":
        raise ModelLoadError(
            f"memory mode nf4 (bitsandbytes) needs a CUDA GPU; this worker runs on {device}. "
            "Use fp8-storage or an offload mode instead."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(
            "memory mode nf4 needs bitsandbytes: pip install 'kontext-server[nf4]'"
        ) from exc


def _nf4_config(dtype: torch.dtype) -> Any:
    """bitsandbytes 4-bit NormalFloat for the transformer and T5, computing in ``dtype``."""
    from diffusers.quantizers.pipe_quant_config import PipelineQuantizationConfig

    quant_kwargs: dict[str, Any] = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": dtype,
    }
    return PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs=quant_kwargs,
        components_to_quantize=["transformer", "text_encoder_2"],
    )


# --- random-weight builds ---------------------------------------------------------------------


def build_random_pipeline(
    arch: KontextArchitecture,
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int | None = None,
) -> Any:
    """A FluxKontextPipeline of ``arch`` with random weights and in-memory tokenizers.

    Each model is constructed directly on ``device`` in ``dtype`` (allocated once, never in
    float32 first); ``seed`` makes every build identical without touching the global RNG.
    """
    with torch.random.fork_rng(devices=[]), _constructing_on(device, dtype):
        if seed is not None:
            torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**arch.transformer)
        vae = AutoencoderKL(**arch.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch.clip))
        text_encoder_2 = T5EncoderModel(T5Config(**arch.t5))
    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_byte_level_clip_tokenizer(arch.clip_max_length),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_character_t5_tokenizer(),
        transformer=transformer,
    )
    models: tuple[Any, ...] = (transformer, vae, text_encoder, text_encoder_2)
    for module in models:
        module.eval()  # T5 dropout would otherwise make runs differ
    return pipe


@contextmanager
def _constructing_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _byte_level_clip_tokenizer(max_length: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with only single-byte tokens (no merges): every prompt tokenizes,
    ids stay below 600, and nothing is downloaded."""
    specials = ["<|startoftext|>", "<|endoftext|>"]
    alphabet = _byte_level_alphabet()
    tokens = [*specials, *alphabet, *(f"{char}</w>" for char in alphabet)]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _character_t5_tokenizer() -> T5Tokenizer:
    """A T5 unigram tokenizer over printable ASCII characters, built in memory."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    printable = [chr(code) for code in range(33, 127)]
    pieces += [(char, -3.0) for char in printable]
    pieces += [(f"▁{char}", -2.5) for char in printable]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 characters a byte-level BPE vocabulary uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


# --- weights from disk or the hub -------------------------------------------------------------


def _load_pretrained(
    model: str, *, allow_download: bool, dtype: torch.dtype, quantization: Any = None
) -> Any:
    is_folder = Path(model).expanduser().is_dir()
    source = str(Path(model).expanduser()) if is_folder else model
    extra: dict[str, Any] = {} if quantization is None else {"quantization_config": quantization}
    return _mapping_errors(
        lambda: FluxKontextPipeline.from_pretrained(
            source, torch_dtype=dtype, local_files_only=not allow_download, **extra
        ),
        tried=f"diffusers folder {source}" if is_folder else f"Hugging Face model {source!r}",
        hint=_pretrained_hint(is_folder, allow_download),
    )


def _pretrained_hint(is_folder: bool, allow_download: bool) -> str:
    if is_folder:
        return "the folder must be a diffusers FluxKontextPipeline (model_index.json, subfolders)"
    if allow_download:
        return "check the model id and your Hugging Face token/network"
    return (
        "it is not in the local Hugging Face cache and downloads are off: set "
        "KONTEXT_ALLOW_DOWNLOAD=1, or pass a local diffusers folder, a .safetensors/.gguf file, "
        "'tiny' or 'dummy-full'"
    )


def _load_single_file(
    path: Path, config_dir: Path | None, *, allow_download: bool, dtype: torch.dtype
) -> Any:
    if not path.is_file():
        raise ModelLoadError(f"transformer file {path} does not exist; give an existing file")
    config_source = _config_source(path, config_dir, allow_download=allow_download)
    local_only = not allow_download
    extra: dict[str, Any] = {}
    if path.suffix == ".gguf":
        from diffusers import GGUFQuantizationConfig

        extra["quantization_config"] = GGUFQuantizationConfig(compute_dtype=dtype)
    transformer = _mapping_errors(
        lambda: FluxTransformer2DModel.from_single_file(
            str(path),
            config=config_source,
            subfolder="transformer",
            torch_dtype=dtype,
            local_files_only=local_only,
            **extra,
        ),
        tried=f"transformer file {path} with the config of {config_source}",
        hint="the file must be a FLUX.1 (Kontext) transformer matching that config",
    )
    return _mapping_errors(
        lambda: FluxKontextPipeline.from_pretrained(
            config_source, transformer=transformer, torch_dtype=dtype, local_files_only=local_only
        ),
        tried=f"the rest of the pipeline (VAE, text encoders) from {config_source}",
        hint="KONTEXT_MODEL_CONFIG_DIR must be a full diffusers FLUX.1-Kontext folder",
    )


def _config_source(path: Path, config_dir: Path | None, *, allow_download: bool) -> str:
    if config_dir is not None:
        if not (config_dir / "model_index.json").is_file():
            raise ModelLoadError(
                f"config folder {config_dir} has no model_index.json; point "
                "KONTEXT_MODEL_CONFIG_DIR at a diffusers FLUX.1-Kontext folder"
            )
        return str(config_dir)
    if allow_download:
        return KONTEXT_HF_ID
    raise ModelLoadError(
        f"{path.name} holds only the transformer: set KONTEXT_MODEL_CONFIG_DIR to a local "
        f"diffusers FLUX.1-Kontext folder (VAE, text encoders, configs), or set "
        f"KONTEXT_ALLOW_DOWNLOAD=1 to fetch them from {KONTEXT_HF_ID}"
    )


def _mapping_errors(load: Callable[[], _T], *, tried: str, hint: str) -> _T:
    """Run ``load``; map whatever diffusers/transformers/hub raise to ``ModelLoadError``."""
    try:
        return load()
    except ModelLoadError:
        raise
    except Exception as exc:  # third-party errors cross into the service here
        raise ModelLoadError(
            f"could not load {tried}: {type(exc).__name__}: {exc}; {hint}"
        ) from exc
