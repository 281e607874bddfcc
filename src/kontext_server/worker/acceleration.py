"""How the engine runs: speed presets and memory modes, applied to a loaded diffusers pipeline.

Two independent settings (``Settings.acceleration`` / ``Settings.memory``):

**Presets** (speed). Each one is a set of levers; every lever comes from a maintained library:

========== ===================================================================================
``none``   plain diffusers: eager, SDPA as torch picks it (the reference for deviations)
``compile`` the same arithmetic: fused QKV projections, the fastest SDPA backend of the GPU
           (cuDNN, else flash) through diffusers' attention dispatcher, and regional
           compilation (``ModelMixin.compile_repeated_blocks``: each of the two block kinds is
           compiled once and reused by all 57 blocks). Other kernels round differently: see
           docs/performance.md for the measured deviation
``fp8``    ``compile`` plus torchao's float8 dynamic activation and weight quantization
           (per-row scales) of the transformer's linear layers; CUDA, compute capability 8.9+
``cache``  ``compile`` plus step caching with diffusers' First Block Cache (a step whose first
           block's residual changed less than ``cache_threshold`` reuses the rest of the blocks'
           residual from the previous step)
``fp8-cache`` ``fp8`` plus step caching
========== ===================================================================================

**Memory modes** (where the weights live), for GPUs smaller than the ~36 GB the resident bf16
pipeline needs. A mode is a storage format, an offload strategy, or both joined by ``+``:

* storage: ``fp8-storage`` (diffusers' layerwise casting: the transformer's and T5's weights are
  kept in float8 and cast to bf16 layer by layer as they run), ``nf4`` (bitsandbytes 4-bit
  NormalFloat, applied while real weights load; CUDA only);
* offload: ``model-offload`` (one model at a time on the GPU, the rest in CPU memory:
  ``enable_model_cpu_offload``), ``group-offload`` (groups of layers streamed to the GPU just
  before they run, on a side CUDA stream: ``enable_group_offload``);
* ``resident``: everything on the GPU (the default).

A GGUF transformer file (``--model x.gguf``) is the third storage format; it is chosen by the
model file, not here.

Per request, fal's ``acceleration`` field (``fal-ai/flux-kontext/dev``) can only move what can
change between two edits of one process, the step cache: ``none`` turns it off for that edit
(every step computes: the result of the preset without caching), ``regular`` keeps the
configured threshold, ``high`` doubles it. Compilation and fp8 are process-wide.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kontext_server.domain.editing import RequestAcceleration
from kontext_server.domain.engine_options import (
    MEMORY_OFFLOADS,
    MEMORY_STORAGES,
    PRESETS,
    AccelerationPreset,
    MemoryMode,
    parse_memory_mode,
)
from kontext_server.domain.errors import ModelLoadError

__all__ = [
    "MEMORY_OFFLOADS",
    "MEMORY_STORAGES",
    "PRESETS",
    "Acceleration",
    "AccelerationPreset",
    "Applied",
    "MemoryMode",
    "RequestAcceleration",
    "apply_acceleration",
    "parse_memory_mode",
    "step_cache_at",
    "step_cache_run",
    "step_cache_threshold",
    "use_compile_cache",
]

log = logging.getLogger(__name__)

DEFAULT_CACHE_THRESHOLD = 0.12
_HIGH_CACHE_FACTOR = 2.0
# float8 matmuls (torch._scaled_mm) need Ada / Hopper or newer
_FP8_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class _Levers:
    compile: bool = False
    fp8: bool = False
    step_cache: bool = False


_PRESET_LEVERS: dict[str, _Levers] = {
    "none": _Levers(),
    "compile": _Levers(compile=True),
    "fp8": _Levers(compile=True, fp8=True),
    "cache": _Levers(compile=True, step_cache=True),
    "fp8-cache": _Levers(compile=True, fp8=True, step_cache=True),
}


@dataclass(frozen=True)
class Acceleration:
    """What the engine applies after loading: a preset, a memory mode, the step cache's
    threshold, and where compiled kernels are kept between restarts."""

    preset: AccelerationPreset = "none"
    memory: MemoryMode = field(default_factory=MemoryMode)
    cache_threshold: float = DEFAULT_CACHE_THRESHOLD
    compile_cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.preset not in _PRESET_LEVERS:
            raise ValueError(f"acceleration {self.preset!r} is not valid; allowed: {PRESETS}")
        if not 0 < self.cache_threshold <= 1:
            raise ValueError(f"cache_threshold is {self.cache_threshold}; allowed: (0, 1]")
        if self.levers.fp8 and self.memory.storage != "bf16":
            raise ValueError(
                f"acceleration {self.preset!r} quantizes the transformer to fp8 itself; it does "
                f"not combine with memory storage {self.memory.storage!r} (pick one)"
            )

    @property
    def levers(self) -> _Levers:
        return _PRESET_LEVERS[self.preset]

    @property
    def compiles(self) -> bool:
        return self.levers.compile

    @property
    def step_cache(self) -> bool:
        return self.levers.step_cache

    def describe(self) -> str:
        text = f"acceleration {self.preset}, memory {self.memory}"
        if self.step_cache:
            text += f", step cache threshold {self.cache_threshold:g}"
        return text


@dataclass
class Applied:
    """What ``apply_acceleration`` did, for logs, the bench and tests."""

    levers: list[str] = field(default_factory=list)
    attention_backend: str | None = None

    def note(self, lever: str) -> None:
        self.levers.append(lever)
        log.info("engine: %s", lever)


def step_cache_threshold(
    acceleration: Acceleration, requested: RequestAcceleration | None
) -> float:
    """The step cache's threshold for one edit: 0 (every step computes) for ``none``, the
    configured one for ``regular`` or no choice, twice that for ``high``."""
    if not acceleration.step_cache or requested == "none":
        return 0.0
    if requested == "high":
        return min(1.0, acceleration.cache_threshold * _HIGH_CACHE_FACTOR)
    return acceleration.cache_threshold


def use_compile_cache(folder: Path) -> None:
    """Keep Inductor's and Triton's caches (compiled kernels, FX graphs, AOTAutograd graphs)
    in ``folder``, so that a restarted worker loads its kernels instead of compiling them.
    Inductor reads these variables each time it looks for its cache."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")


def apply_acceleration(pipe: Any, acceleration: Acceleration, device: torch.device) -> Applied:
    """Apply ``acceleration`` to a loaded ``FluxKontextPipeline`` in the order the levers
    need: fuse, quantize, cache hooks, offload, then compile. Raises ``ModelLoadError`` when a
    lever cannot run here (no CUDA, a missing package), saying what to do instead."""
    applied = Applied()
    levers = acceleration.levers
    transformer = pipe.transformer
    if levers.compile:
        transformer.fuse_qkv_projections()
        _drop_unfused_projections(transformer)
        applied.note("fused QKV projections")
        applied.attention_backend = _fastest_attention(transformer, device)
        if applied.attention_backend:
            applied.note(f"attention backend {applied.attention_backend}")
    if levers.fp8:
        _quantize_fp8(transformer, device)
        applied.note("torchao float8 dynamic activation + weight quantization (per row)")
    if acceleration.memory.storage == "fp8-storage":
        _store_in_fp8(pipe)
        applied.note("weights stored in float8 (layerwise casting)")
        if acceleration.memory.offload == "resident":
            # loaded into CPU memory in bf16 (it may not fit the GPU that way): cast, then move
            pipe.to(device)
    if levers.step_cache:
        from diffusers.hooks.first_block_cache import FirstBlockCacheConfig

        transformer.enable_cache(FirstBlockCacheConfig(threshold=acceleration.cache_threshold))
        applied.note(f"first block cache (threshold {acceleration.cache_threshold:g})")
    _offload(pipe, acceleration.memory, device, applied)
    if levers.compile:
        if acceleration.compile_cache_dir is not None:
            use_compile_cache(acceleration.compile_cache_dir)
        # Hooks on the blocks break the graph by design: the step cache's decision (a .item()),
        # group offload's onload (compiler-disabled), layerwise casting's weight swap. Whole
        # blocks compile in one graph only without them.
        hooked = (
            levers.step_cache
            or acceleration.memory.offload == "group-offload"
            or acceleration.memory.storage != "bf16"
        )
        transformer.compile_repeated_blocks(fullgraph=not hooked)
        applied.note("regional compilation of the repeated transformer blocks")
    return applied


@contextmanager
def step_cache_at(pipe: Any, threshold: float) -> Iterator[None]:
    """Run the block inside with the step cache's threshold set to ``threshold`` (0: every
    step computes). Does nothing when the transformer has no step cache."""
    hooks = list(_first_block_cache_heads(pipe.transformer))
    previous = [hook.threshold for hook in hooks]
    for hook in hooks:
        hook.threshold = threshold
    try:
        yield
    finally:
        for hook, value in zip(hooks, previous, strict=True):
            hook.threshold = value


@contextmanager
def step_cache_run(pipe: Any) -> Iterator[None]:
    """One denoising run with the step cache: its state lives for this run only (the
    Kontext pipeline of diffusers opens no cache context itself). Does nothing without a
    step cache."""
    transformer = pipe.transformer
    if getattr(transformer, "_cache_config", None) is None:
        yield
        return
    try:
        with transformer.cache_context("cond"):
            yield
    finally:
        transformer._reset_stateful_cache()


def _first_block_cache_heads(transformer: Any) -> Iterator[Any]:
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        hook = registry.get_hook(_FBC_LEADER_BLOCK_HOOK)
        if hook is not None:
            yield hook


def _drop_unfused_projections(transformer: Any) -> None:
    """diffusers' fusion adds ``to_qkv`` / ``to_added_qkv`` next to the separate projections,
    which the fused path never reads again: on the full model they are 2.15 B parameters
    (4.3 GB in bf16) that would stay resident, be moved by offload and be quantized by fp8."""
    replaced_by = {
        "to_qkv": ("to_q", "to_k", "to_v"),
        "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
    }
    for module in transformer.modules():
        if not getattr(module, "fused_projections", False):
            continue
        for fused, separate in replaced_by.items():
            if hasattr(module, fused):
                for name in separate:
                    delattr(module, name)


def _fastest_attention(transformer: Any, device: torch.device) -> str | None:
    """cuDNN attention on a GPU that has it (Hopper: the fastest SDPA kernel torch ships),
    else flash; on the CPU torch's own choice stays."""
    if device.type != "cuda":
        return None
    from torch.nn.attention import SDPBackend

    candidates = [("_native_cudnn", SDPBackend.CUDNN_ATTENTION)]
    candidates.append(("_native_flash", SDPBackend.FLASH_ATTENTION))
    for name, backend in candidates:
        if _sdpa_backend_runs(backend, device):
            transformer.set_attention_backend(name)
            return name
    return None


def _sdpa_backend_runs(backend: Any, device: torch.device) -> bool:
    """Try the backend on a small bf16 attention of Flux's head size."""
    from torch.nn.attention import sdpa_kernel

    query = torch.randn(1, 2, 64, 128, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel([backend]):
            torch.nn.functional.scaled_dot_product_attention(query, query, query)
    except RuntimeError:
        return False
    return True


def _quantize_fp8(transformer: Any, device: torch.device) -> None:
    if device.type != "cuda":
        raise ModelLoadError(
            f"acceleration fp8 needs a CUDA GPU (compute capability 8.9 or newer); this worker "
            f"runs on {device}. Use acceleration compile or cache on this machine."
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < _FP8_MIN_CAPABILITY:
        raise ModelLoadError(
            f"acceleration fp8 needs compute capability 8.9 or newer (Ada, Hopper); this GPU "
            f"has {capability[0]}.{capability[1]}. Use acceleration compile or cache."
        )
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )
    except ImportError as exc:
        raise ModelLoadError(
            "acceleration fp8 needs torchao: pip install 'kontext-server[fp8]' (or torchao)"
        ) from exc
    quantize_(
        transformer,
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        filter_fn=_in_a_block,
    )


def _in_a_block(module: torch.nn.Module, name: str) -> bool:
    """Linear layers of the repeated blocks: the 99 % of FLOPs. Embedders and the output
    projection stay in bf16 (small, and more sensitive)."""
    return isinstance(module, torch.nn.Linear) and name.startswith(
        ("transformer_blocks.", "single_transformer_blocks.")
    )


def _store_in_fp8(pipe: Any) -> None:
    """The transformer and T5 (the two big models) keep float8 weights; each layer is cast
    to the compute dtype while it runs. Norms, embeddings and positional parts stay as they
    are (diffusers' defaults for the transformer; T5's layer norms and embeddings here)."""
    compute_dtype = pipe.transformer.dtype
    pipe.transformer.enable_layerwise_casting(
        storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype
    )
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting

    apply_layerwise_casting(
        pipe.text_encoder_2,
        storage_dtype=torch.float8_e4m3fn,
        compute_dtype=compute_dtype,
        skip_modules_pattern=("shared", "embed", "layer_norm", "relative_attention_bias", r"\.wo$"),
    )


def _offload(pipe: Any, memory: MemoryMode, device: torch.device, applied: Applied) -> None:
    if memory.offload == "model-offload":
        # accelerate's hooks: each model moves to `device` when it runs and back after
        pipe.enable_model_cpu_offload(device=device)
        applied.note("model CPU offload")
    elif memory.offload == "group-offload":
        on_gpu = device.type == "cuda"
        pipe.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=on_gpu,  # the next group moves while the current one computes
            non_blocking=on_gpu,
        )
        applied.note("group offload (block level" + (", CUDA stream)" if on_gpu else ")"))
