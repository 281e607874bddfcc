"""The edit: a prompt plus one or more reference images in, encoded images out (FLUX.1 Kontext).

:class:`KontextPipeline` implements ``editing.EditPipeline`` on top of diffusers'
``FluxKontextPipeline``. What it adds to diffusers, and why:

* **BFL's output sizes.** diffusers makes 1024x1024 whatever the input; here the output takes
  the bucket nearest to the first reference's aspect (or ``aspect_ratio`` at ~1 MP), see
  ``kontext_server.domain.sizing``.
* **Several references** with ComfyUI's "offset" scheme, by subclassing diffusers' pipeline
  (:class:`MultiReferenceFluxKontextPipeline`) and overriding only ``prepare_latents``: each
  reference is VAE-encoded on its own, all reference tokens get time id 1 and positions on one
  virtual canvas. One reference goes through the same code and equals stock diffusers.
* **No reference** (text-to-image): the stock pipeline with ``image=None`` generates from the
  prompt alone, at ``aspect_ratio`` (default 1:1) and ~1 MP.
* **Seeds** portable and independent of ``num_images``: one CPU generator per image (seed,
  seed+1, ...) and one denoising run per image; prompt and references are encoded once.
* **Progress and cancellation** after every step; cancelling raises ``EditCancelled`` from the
  step callback, so nothing is decoded.
* **Encoding off the critical path**: image *i* is JPEG/PNG-encoded in a thread while image
  *i+1* denoises.
* **Acceleration** (``worker.acceleration``): a speed preset and a memory mode applied once
  after loading; ``warmup()`` compiles before the first request; fal's per-request
  ``acceleration`` sets the step cache for one edit.
* **Prompt embeddings cached**: the T5 and CLIP outputs of the last ``prompt_cache_size``
  prompts are kept on the device; a repeated prompt skips both text encoders.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from PIL import Image

from kontext_server.config import Settings
from kontext_server.domain import sizing
from kontext_server.domain.editing import EditRequest, EditResult, EncodedImage
from kontext_server.domain.errors import EditCancelled, InputError
from kontext_server.worker import imaging
from kontext_server.worker.acceleration import (
    Acceleration,
    Applied,
    apply_acceleration,
    parse_memory_mode,
    step_cache_at,
    step_cache_run,
    step_cache_threshold,
)
from kontext_server.worker.models import load_kontext_pipeline, resolve_device

__all__ = [
    "MAX_NUM_IMAGES",
    "MAX_STEPS",
    "KontextPipeline",
    "MultiReferenceFluxKontextPipeline",
    "PackedReferences",
    "PromptCache",
    "acceleration_from_settings",
]

logger = logging.getLogger(__name__)

# diffusers registers a pipeline's components at run time, so its classes are Any to mypy.
FluxKontextPipeline: Any = diffusers.FluxKontextPipeline

MAX_NUM_IMAGES = 4
MAX_STEPS = 100
MAX_SEED = 2**64 - 1
_DRAWN_SEED_BOUND = 2**53  # fits a JSON number exactly
_REAL_WEIGHTS_DEFAULT_STEPS = 28
_RANDOM_WEIGHTS_DEFAULT_STEPS = 4
_TEXT_MAX_SEQUENCE_LENGTH = 512  # diffusers' default for Kontext
DEFAULT_PROMPT_CACHE_SIZE = 32  # T5 output: 512 x 4096 bf16 = 4 MiB a prompt on the GPU
_WARMUP_PROMPT = "warm up: compile the transformer blocks"
# Shapes compiled before the first request: the square bucket first (kept as static kernels),
# then a second shape, which makes torch.compile build the dynamic-shape kernels that serve
# every other size without compiling again.
_WARMUP_ASPECTS = ("1:1", "4:3")


@dataclass(frozen=True)
class PackedReferences:
    """VAE latents of every reference, packed into tokens and concatenated, with their ids.

    ``latents``: (1, tokens, channels * 4); ``ids``: (tokens, 3) as (time, y, x).
    """

    latents: torch.Tensor
    ids: torch.Tensor


class MultiReferenceFluxKontextPipeline(FluxKontextPipeline):
    """diffusers' FluxKontextPipeline, conditioned on references encoded beforehand.

    Inside ``with pipe.conditioned_on(references):`` call the pipeline with ``image=None``:
    ``prepare_latents`` then returns the packed references and their ids instead of encoding
    ``image``. Outside that block it behaves exactly like the stock pipeline.
    """

    _references: PackedReferences | None = None

    @contextmanager
    def conditioned_on(self, references: PackedReferences) -> Iterator[None]:
        self._references = references
        try:
            yield
        finally:
            self._references = None

    @torch.no_grad()
    def encode_references(
        self, images: Sequence[Image.Image], sizes: Sequence[tuple[int, int]]
    ) -> PackedReferences:
        """VAE-encode each image at its ``(width, height)`` (multiples of 16) and place it on
        the virtual canvas: time id 1, position offset by ``sizing.reference_offsets``."""
        device, dtype = self._execution_device, self.vae.dtype
        token_sizes = [(width // 16, height // 16) for width, height in sizes]
        offsets = sizing.reference_offsets(token_sizes)
        latents, ids = [], []
        for image, (width, height), (y_offset, x_offset) in zip(
            images, sizes, offsets, strict=True
        ):
            pixels = self.image_processor.preprocess(
                self.image_processor.resize(image, height, width), height, width
            )
            encoded = self._encode_vae_image(pixels.to(device=device, dtype=dtype), generator=None)
            channels, latent_h, latent_w = encoded.shape[1:]
            latents.append(self._pack_latents(encoded, 1, channels, latent_h, latent_w))
            image_ids = self._prepare_latent_image_ids(
                1, latent_h // 2, latent_w // 2, device, dtype
            )
            image_ids[..., 0] = 1
            image_ids[..., 1] += y_offset
            image_ids[..., 2] += x_offset
            ids.append(image_ids)
        return PackedReferences(latents=torch.cat(latents, dim=1), ids=torch.cat(ids, dim=0))

    def prepare_latents(
        self,
        image: torch.Tensor | None,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        references = self._references
        if references is None:
            return super().prepare_latents(
                image,
                batch_size,
                num_channels_latents,
                height,
                width,
                dtype,
                device,
                generator,
                latents,
            )
        # The noise comes from the same call as in stock diffusers (image=None draws nothing
        # else from the generator), so one reference reproduces the stock pipeline exactly.
        noise, _, latent_ids, _ = super().prepare_latents(
            None, batch_size, num_channels_latents, height, width, dtype, device, generator, latents
        )
        image_latents = references.latents.to(device=device, dtype=dtype)
        image_latents = image_latents.expand(batch_size, -1, -1)
        return noise, image_latents, latent_ids, references.ids.to(device=device, dtype=dtype)


class KontextPipeline:
    """The engine: ``edit(request)`` -> encoded images, the seed used and timings.

    Build it with :meth:`from_settings` / :meth:`load`, or around an existing diffusers
    pipeline. ``area_px`` (tests, previews) scales every output and reference size down to
    that many pixels; ``None`` keeps BFL's ~1 MP buckets. One edit at a time per instance.
    """

    def __init__(
        self,
        pipe: Any,
        *,
        random_weights: bool,
        default_steps: int | None = None,
        multi_reference_budget_px: int = 2 * sizing.ONE_MEGAPIXEL,
        area_px: int | None = None,
        model_name: str = "",
        acceleration: Acceleration | None = None,
        device: torch.device | None = None,
        prompt_cache_size: int = DEFAULT_PROMPT_CACHE_SIZE,
    ) -> None:
        self.pipe = _as_multi_reference(pipe)
        self.pipe.set_progress_bar_config(disable=True)
        self.acceleration = acceleration or Acceleration()
        self.applied: Applied = apply_acceleration(
            self.pipe, self.acceleration, device or self.pipe._execution_device
        )
        self.prompt_cache = PromptCache(prompt_cache_size)
        self.capture_latents = False  # the bench's deviation: keep the last final latents
        self.last_latents: torch.Tensor | None = None
        self.random_weights = random_weights
        fallback_steps = (
            _RANDOM_WEIGHTS_DEFAULT_STEPS if random_weights else _REAL_WEIGHTS_DEFAULT_STEPS
        )
        self.default_steps = default_steps or fallback_steps
        self.multi_reference_budget_px = multi_reference_budget_px
        self.area_px = area_px
        self.model_name = model_name
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        if random_weights:
            logger.warning("model %r has RANDOM weights: every output image is noise", model_name)

    @classmethod
    def load(
        cls,
        model: str,
        *,
        device: str | None = None,
        config_dir: Path | None = None,
        allow_download: bool = False,
        default_steps: int | None = None,
        multi_reference_budget_px: int = 2 * sizing.ONE_MEGAPIXEL,
        acceleration: Acceleration | None = None,
        prompt_cache_size: int = DEFAULT_PROMPT_CACHE_SIZE,
    ) -> KontextPipeline:
        """Load ``model`` (see ``worker.models``) and apply ``acceleration``; raises
        ``ModelLoadError``."""
        acceleration = acceleration or Acceleration()
        pipe, random_weights = load_kontext_pipeline(
            model,
            device=device,
            config_dir=config_dir,
            allow_download=allow_download,
            memory=acceleration.memory,
        )
        return cls(
            pipe,
            random_weights=random_weights,
            default_steps=default_steps,
            multi_reference_budget_px=multi_reference_budget_px,
            model_name=model,
            acceleration=acceleration,
            device=resolve_device(device),
            prompt_cache_size=prompt_cache_size,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> KontextPipeline:
        return cls.load(
            settings.model,
            device=settings.device,
            config_dir=settings.model_config_dir,
            allow_download=settings.allow_download,
            default_steps=settings.default_steps,
            multi_reference_budget_px=settings.multi_reference_budget_px,
            acceleration=acceleration_from_settings(settings),
            prompt_cache_size=settings.prompt_cache_size,
        )

    def describe_acceleration(self, requested: str) -> str | None:
        """One line for a job's logs: what fal's ``acceleration`` does on this engine (None
        when it asks for nothing: "none" where there is no step cache to turn off)."""
        configured = self.acceleration.describe()
        if not self.acceleration.step_cache:
            if requested == "none":
                return None
            return (
                f"acceleration {requested!r}: this worker runs {configured}; without a step "
                "cache the request's choice changes nothing"
            )
        threshold = step_cache_threshold(self.acceleration, requested)  # type: ignore[arg-type]
        state = "off" if threshold == 0 else f"threshold {threshold:g}"
        return f"acceleration {requested!r}: step cache {state} ({configured})"

    def warmup(self, steps: int = 2) -> float:
        """Run throwaway edits at the shapes compiled ahead (``_WARMUP_ASPECTS``) so that the
        first request does not pay for compilation; returns the seconds it took. Without a
        compiling preset one short edit still loads the kernels (cuDNN, cuBLAS) once."""
        started = time.perf_counter()
        aspects = _WARMUP_ASPECTS if self.acceleration.compiles else _WARMUP_ASPECTS[:1]
        side = 1024 if self.area_px is None else max(16, int(self.area_px**0.5))
        # With a step cache, both of its branches are compiled: every step computed
        # (threshold 0), and steps that reuse the cached residual (threshold 1: from the
        # second step on, every step is skipped).
        thresholds = (0.0, 1.0) if self.acceleration.step_cache else (None,)
        for aspect in aspects:
            reference = Image.new("RGB", (side, side), (127, 127, 127))
            request = EditRequest(
                prompt=_WARMUP_PROMPT,
                images=[reference],
                seed=0,
                aspect_ratio=aspect,
                num_inference_steps=max(steps, 3) if self.acceleration.step_cache else steps,
            )
            for threshold in thresholds:
                self._warmup_edit(request, threshold)
        self.prompt_cache.clear()
        return time.perf_counter() - started

    def _warmup_edit(self, request: EditRequest, threshold: float | None) -> None:
        if threshold is None:
            self.edit(request)
        else:
            self._edit(request, None, None, threshold)

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    def close(self) -> None:
        """Stop the encoding thread (it is also stopped when the process exits)."""
        self._encoder.shutdown(wait=True)

    def edit(
        self,
        request: EditRequest,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> EditResult:
        """Run one edit (see ``editing.EditPipeline``).

        No images: text-to-image at ``aspect_ratio`` (default 1:1), ~1 MP. Raises
        ``InputError`` for a request the engine cannot run (num_images outside 1-4, steps
        outside 1-100, bad aspect ratio, match_input without an image or with an aspect ratio,
        seed out of range) and ``EditCancelled`` when ``should_cancel()`` turned true after a
        step.
        """
        threshold = step_cache_threshold(self.acceleration, request.acceleration)
        return self._edit(request, on_step, should_cancel, threshold)

    def _edit(
        self,
        request: EditRequest,
        on_step: Callable[[int, int], None] | None,
        should_cancel: Callable[[], bool] | None,
        cache_threshold: float,
    ) -> EditResult:
        started = time.perf_counter()
        steps = request.num_inference_steps or self.default_steps
        seed = _validated(request, steps)
        width, height = self.output_size(request)
        references, prompt = self._prepare(request)
        prepared = time.perf_counter()
        progress = _StepReporter(
            steps * request.num_images, on_step, should_cancel, capture=self.capture_latents
        )
        encodings: list[Future[tuple[EncodedImage, float]]] = []
        with step_cache_at(self.pipe, cache_threshold):
            for index in range(request.num_images):
                image = self._denoise(
                    request, references, prompt, seed + index, width, height, steps, progress
                )
                encodings.append(self._encoder.submit(_timed_encode, image, request.output_format))
        final = progress.last_latents  # copied once, after the last step
        self.last_latents = None if final is None else final.float().cpu()
        inferred = time.perf_counter()
        encoded = [future.result() for future in encodings]
        finished = time.perf_counter()
        # Seconds under the contract's plain names (the HTTP layer reads "inference" as fal's
        # timings); the mean step is the one value in milliseconds, and says so.
        timings = {
            "prepare": prepared - started,
            "inference": inferred - prepared,
            "encode": sum(seconds for _, seconds in encoded),
            "encode_wait": finished - inferred,
            "total": finished - started,
            "step_ms": progress.mean_step_ms(),
        }
        return EditResult(
            images=[image for image, _ in encoded],
            seed=seed,
            timings=timings,
            random_weights=self.random_weights,
            steps=progress.done_steps,
            gpu_memory_bytes=_gpu_memory(self.device),
        )

    def output_size(self, request: EditRequest) -> tuple[int, int]:
        """``(width, height)`` of the request's outputs (see ``sizing``)."""
        if not request.images:
            return sizing.text_to_image_size(request.aspect_ratio, area_px=self.area_px)
        return sizing.output_size(
            *request.images[0].size,
            request.aspect_ratio,
            match_input=request.match_input_size,
            area_px=self.area_px,
        )

    def reference_sizes(self, images: Sequence[Image.Image]) -> list[tuple[int, int]]:
        """The ``(width, height)`` each reference is resized to (own bucket, within budget)."""
        if len(images) == 1:  # BFL's single-reference path: the bucket, no budget
            return [sizing.output_size(*images[0].size, area_px=self.area_px)]
        return sizing.reference_sizes(
            [image.size for image in images],
            budget_px=self.multi_reference_budget_px,
            area_px=self.area_px,
        )

    def _prepare(
        self, request: EditRequest
    ) -> tuple[PackedReferences | None, dict[str, torch.Tensor]]:
        """Encode the references (none for text-to-image) and the prompt once for all images
        of the request."""
        references = None
        if request.images:
            references = self.pipe.encode_references(
                request.images, self.reference_sizes(request.images)
            )
        prompt = self.prompt_cache.get(request.prompt)
        if prompt is None:
            with torch.no_grad():
                prompt_embeds, pooled_prompt_embeds, _ = self.pipe.encode_prompt(
                    prompt=request.prompt,
                    prompt_2=None,
                    device=self.device,
                    num_images_per_prompt=1,
                    max_sequence_length=_TEXT_MAX_SEQUENCE_LENGTH,
                )
            prompt = {
                "prompt_embeds": prompt_embeds,
                "pooled_prompt_embeds": pooled_prompt_embeds,
            }
            self.prompt_cache.put(request.prompt, prompt)
        return references, prompt

    def _denoise(
        self,
        request: EditRequest,
        references: PackedReferences | None,
        prompt: dict[str, torch.Tensor],
        seed: int,
        width: int,
        height: int,
        steps: int,
        progress: _StepReporter,
    ) -> Image.Image:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        # No references: the stock pipeline with image=None generates from the prompt alone.
        conditioning: AbstractContextManager[None] = (
            contextlib.nullcontext() if references is None else self.pipe.conditioned_on(references)
        )
        with conditioning, step_cache_run(self.pipe):
            output = self.pipe(
                image=None,
                height=height,
                width=width,
                max_area=width * height,  # else diffusers rescales to 1024x1024
                num_inference_steps=steps,
                guidance_scale=request.guidance_scale,
                generator=generator,
                callback_on_step_end=progress.callback,
                callback_on_step_end_tensor_inputs=["latents"] if progress.capture else [],
                output_type="pil",
                **prompt,
            )
        image: Image.Image = output.images[0]
        return image


class _StepReporter:
    """The diffusers step callback: reports progress over all images, polls cancellation and
    keeps step durations."""

    def __init__(
        self,
        total_steps: int,
        on_step: Callable[[int, int], None] | None,
        should_cancel: Callable[[], bool] | None,
        *,
        capture: bool = False,
    ) -> None:
        self.capture = capture
        self.last_latents: torch.Tensor | None = None
        self.total_steps = total_steps
        self.on_step = on_step
        self.should_cancel = should_cancel
        self.done_steps = 0
        self.step_durations_s: list[float] = []
        self._last_step_at: float | None = None

    def callback(
        self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]
    ) -> dict[str, Any]:
        now = time.perf_counter()
        if step > 0 and self._last_step_at is not None:
            self.step_durations_s.append(now - self._last_step_at)
        self._last_step_at = now
        self.done_steps += 1
        if self.capture:
            self.last_latents = tensors["latents"].detach()  # a reference: no copy per step
        if self.on_step is not None:
            self.on_step(self.done_steps, self.total_steps)
        if self.should_cancel is not None and self.should_cancel():
            # Raising (not pipe._interrupt) is what keeps diffusers from decoding.
            raise EditCancelled(f"cancelled after step {self.done_steps} of {self.total_steps}")
        return {}

    def mean_step_ms(self) -> float:
        if not self.step_durations_s:
            return 0.0
        return 1000.0 * sum(self.step_durations_s) / len(self.step_durations_s)


class PromptCache:
    """The text encoders' outputs of recent prompts, least recently used dropped first.

    Keyed by the prompt text alone: one engine has one model, and the embeddings depend on
    nothing else. Tensors stay on the device they were made on. ``size`` 0 turns it off."""

    def __init__(self, size: int) -> None:
        self.size = max(0, size)
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, prompt: str) -> dict[str, torch.Tensor] | None:
        with self._lock:
            entry = self._entries.get(prompt)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(prompt)
            self.hits += 1
            return entry

    def put(self, prompt: str, embeddings: dict[str, torch.Tensor]) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._entries[prompt] = embeddings
            self._entries.move_to_end(prompt)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry and the hit/miss counts."""
        with self._lock:
            self._entries.clear()
            self.hits = 0
            self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)


def acceleration_from_settings(settings: Settings) -> Acceleration:
    """The engine's ``Acceleration`` from ``KONTEXT_ACCELERATION``, ``KONTEXT_MEMORY``,
    ``KONTEXT_CACHE_THRESHOLD`` and the compile cache folder (under the data dir)."""
    return Acceleration(
        preset=settings.acceleration,
        memory=parse_memory_mode(settings.memory),
        cache_threshold=settings.cache_threshold,
        compile_cache_dir=settings.compile_cache_dir(),
    )


def _as_multi_reference(pipe: Any) -> MultiReferenceFluxKontextPipeline:
    if isinstance(pipe, MultiReferenceFluxKontextPipeline):
        return pipe
    return MultiReferenceFluxKontextPipeline(**pipe.components)


def _validated(request: EditRequest, steps: int) -> int:
    """Check what the engine cannot run; return the seed (drawn when not given)."""
    if request.match_input_size and not request.images:
        raise InputError("match_input needs an input image to take the size from")
    if not 1 <= request.num_images <= MAX_NUM_IMAGES:
        raise InputError(f"num_images is {request.num_images}; allowed: 1 to {MAX_NUM_IMAGES}")
    if not 1 <= steps <= MAX_STEPS:
        raise InputError(f"num_inference_steps is {steps}; allowed: 1 to {MAX_STEPS}")
    if request.aspect_ratio is not None:
        sizing.parse_aspect_ratio(request.aspect_ratio)
    seed = secrets.randbelow(_DRAWN_SEED_BOUND) if request.seed is None else request.seed
    if not 0 <= seed <= MAX_SEED - (request.num_images - 1):
        raise InputError(f"seed is {seed}; allowed: 0 to {MAX_SEED - request.num_images + 1}")
    return seed


def _timed_encode(image: Image.Image, fmt: Any) -> tuple[EncodedImage, float]:
    started = time.perf_counter()
    encoded = imaging.encode_image(image, fmt)
    return encoded, time.perf_counter() - started


def _gpu_memory(device: torch.device) -> dict[str, int]:
    """Allocated and peak CUDA memory of this process (empty on the CPU), for metrics."""
    if device.type != "cuda":
        return {}
    return {
        "allocated": int(torch.cuda.memory_allocated(device)),
        "peak": int(torch.cuda.max_memory_allocated(device)),
    }
