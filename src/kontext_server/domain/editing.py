"""Typed request and result of one edit: torch-free, shared by the worker and the CLI."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from PIL import Image

__all__ = [
    "EditPipeline",
    "EditRequest",
    "EditResult",
    "EncodedImage",
    "OutputFormat",
    "RequestAcceleration",
]

OutputFormat = Literal["jpeg", "png"]
# fal [dev]'s per-request speed/quality choice; None: the worker's configured preset as is
RequestAcceleration = Literal["none", "regular", "high"]


@dataclass(frozen=True)
class EditRequest:
    """One edit. ``images`` are decoded RGB references: one, several for /multi, or none for
    text-to-image (the output is then ``aspect_ratio``, default 1:1, at ~1 MP)."""

    prompt: str
    images: list[Image.Image]
    seed: int | None = None  # None: drawn and returned
    guidance_scale: float = 3.5
    num_images: int = 1
    aspect_ratio: str | None = None  # "W:H"; None: follow the (first) input
    num_inference_steps: int | None = None  # None: the model's default
    output_format: OutputFormat = "jpeg"
    # True: the output keeps the first input's own size (fal [dev]'s resolution_mode
    # "match_input"); only without aspect_ratio. See sizing.output_size.
    match_input_size: bool = False
    # fal [dev]'s acceleration: "none" turns a preset's step cache off for this edit, "high"
    # raises its threshold (worker.acceleration); compile and fp8 are the process's own.
    acceleration: RequestAcceleration | None = None


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    width: int
    height: int
    content_type: str  # image/jpeg | image/png

    @property
    def extension(self) -> str:
        return "png" if self.content_type == "image/png" else "jpeg"


@dataclass(frozen=True)
class EditResult:
    images: list[EncodedImage]
    seed: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds: inference, encode, ...
    random_weights: bool = False  # True for tiny / dummy-full: outputs are noise
    steps: int = 0  # denoising steps run (all images together)
    gpu_memory_bytes: dict[str, int] = field(default_factory=dict)  # allocated / peak (CUDA)


class EditPipeline(Protocol):
    """What the worker needs from an engine. ``worker.pipeline.KontextPipeline`` is the real
    one; tests may pass hand-written fakes."""

    random_weights: bool
    default_steps: int

    def edit(
        self,
        request: EditRequest,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> EditResult:
        """Run one edit. ``on_step(step, total)`` after every denoising step (1-based);
        ``should_cancel()`` is polled after every step and a True stops the edit with
        ``EditCancelled`` before anything is decoded."""
        ...
