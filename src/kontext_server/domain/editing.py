"""Typed edits: what a request asks (``EditInput``, kept by the store), what an engine runs
(``EditRequest``, with decoded images) and what it answers. Torch-free, protocol-free: each
protocol's skin (``http/fal``, ``http/bfl``, ``http/openai``) maps its request to an
``EditInput`` once; the stores keep ``EditInput.to_record()``; both engines read it.

The defaults of an edit live here and nowhere else (``DEFAULT_GUIDANCE_SCALE`` ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, get_args

from PIL import Image

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_SAFETY_TOLERANCE",
    "EDIT_INPUT_VERSION",
    "OUTPUT_FORMATS",
    "REQUEST_ACCELERATIONS",
    "SAFETY_TOLERANCES",
    "EditInput",
    "EditOutput",
    "EditPipeline",
    "EditRequest",
    "EditResult",
    "EncodedImage",
    "OutputFormat",
    "OutputImage",
    "RequestAcceleration",
]

OutputFormat = Literal["jpeg", "png"]
OUTPUT_FORMATS: Final = get_args(OutputFormat)
# fal [dev]'s per-request speed/quality choice; None: the worker's configured preset as is
RequestAcceleration = Literal["none", "regular", "high"]
REQUEST_ACCELERATIONS: Final = get_args(RequestAcceleration)

DEFAULT_GUIDANCE_SCALE: Final = 3.5  # FLUX.1 Kontext's distilled guidance (fal's default)
SAFETY_TOLERANCES: Final = (1, 2, 3, 4, 5, 6)  # 1 strictest, 6 most permissive
DEFAULT_SAFETY_TOLERANCE: Final = 2
# The version of ``EditInput.to_record()``; rows without one are the older fal-shaped input
# (``store/inputs.py`` reads them).
EDIT_INPUT_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class EditInput:
    """One edit as asked, in diffusers' words, before anything is fetched.

    ``references``: the reference images as URLs (http(s), ``data:``, or this server's own
    file URLs), in order; empty for text-to-image (the output is then ``aspect_ratio``, 1:1
    when unset, at ~1 MP). ``inline_output``: answer the images as ``data:`` URIs and store no
    file. ``match_input_size``: the output keeps the first reference's own size (only without
    ``aspect_ratio``)."""

    prompt: str
    references: tuple[str, ...] = ()
    seed: int | None = None  # None: drawn by the engine and returned
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    num_inference_steps: int | None = None  # None: the model's default
    num_images: int = 1
    aspect_ratio: str | None = None  # "W:H"; None: follow the (first) reference
    match_input_size: bool = False
    output_format: OutputFormat = "jpeg"
    inline_output: bool = False
    safety_tolerance: int = DEFAULT_SAFETY_TOLERANCE
    enhance_prompt: bool = False
    acceleration: RequestAcceleration | None = None

    def __post_init__(self) -> None:
        if self.safety_tolerance not in SAFETY_TOLERANCES:
            raise ValueError(f"safety_tolerance must be 1 to 6; got {self.safety_tolerance!r}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be jpeg or png; got {self.output_format!r}")
        if self.acceleration is not None and self.acceleration not in REQUEST_ACCELERATIONS:
            raise ValueError(
                f"acceleration must be none, regular or high; got {self.acceleration!r}"
            )
        if not isinstance(self.references, tuple):
            object.__setattr__(self, "references", tuple(self.references))

    def to_record(self) -> dict[str, Any]:
        """The JSON the stores keep (versioned; ``from_record`` reads it back)."""
        return {
            "v": EDIT_INPUT_VERSION,
            "prompt": self.prompt,
            "references": list(self.references),
            "seed": self.seed,
            "guidance_scale": self.guidance_scale,
            "num_inference_steps": self.num_inference_steps,
            "num_images": self.num_images,
            "aspect_ratio": self.aspect_ratio,
            "match_input_size": self.match_input_size,
            "output_format": self.output_format,
            "inline_output": self.inline_output,
            "safety_tolerance": self.safety_tolerance,
            "enhance_prompt": self.enhance_prompt,
            "acceleration": self.acceleration,
        }

    @staticmethod
    def is_record(data: Mapping[str, Any]) -> bool:
        return data.get("v") == EDIT_INPUT_VERSION

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> EditInput:
        """The inverse of ``to_record``; absent fields take their defaults."""
        if not cls.is_record(data):
            raise ValueError(f"not an edit input record of version {EDIT_INPUT_VERSION}")
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        known["references"] = tuple(known.get("references") or ())
        return cls(**known)


@dataclass(frozen=True)
class EditRequest:
    """One edit. ``images`` are decoded RGB references: one, several for /multi, or none for
    text-to-image (the output is then ``aspect_ratio``, default 1:1, at ~1 MP)."""

    prompt: str
    images: list[Image.Image]
    seed: int | None = None  # None: drawn and returned
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
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

    @classmethod
    def of(cls, edit: EditInput, images: list[Image.Image]) -> EditRequest:
        """The engine's request for ``edit`` once its references are decoded."""
        return cls(
            prompt=edit.prompt,
            images=images,
            seed=edit.seed,
            guidance_scale=edit.guidance_scale,
            num_images=edit.num_images,
            aspect_ratio=edit.aspect_ratio,
            num_inference_steps=edit.num_inference_steps,
            output_format=edit.output_format,
            match_input_size=edit.match_input_size,
            acceleration=edit.acceleration,
        )


@dataclass(frozen=True, slots=True)
class OutputImage:
    """One published output image: in the file store under ``file_key``, or inline as a
    ``data:`` URI in ``url`` (``EditInput.inline_output``)."""

    width: int
    height: int
    content_type: str  # image/jpeg | image/png
    file_size: int
    file_name: str
    file_key: str | None = None
    url: str | None = None


@dataclass(frozen=True, slots=True)
class EditOutput:
    """What a succeeded edit published. ``Job.result`` holds ``to_record()`` (the JSON the
    stores keep; its keys are those of the endpoint's output); ``Job.output`` reads it back.
    ``nsfw_flags``: per image, whether the content check replaced it by a black image."""

    images: tuple[OutputImage, ...]
    seed: int
    prompt: str
    nsfw_flags: tuple[bool, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)  # seconds: inference, encode, ...
    random_weights: bool = False  # True for tiny / dummy-full: outputs are noise

    def to_record(self) -> dict[str, Any]:
        return {
            "images": [
                {name: getattr(image, name) for name in OutputImage.__dataclass_fields__}
                for image in self.images
            ],
            "timings": dict(self.timings),
            "seed": self.seed,
            "has_nsfw_concepts": list(self.nsfw_flags),
            "prompt": self.prompt,
            "random_weights": self.random_weights,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> EditOutput:
        """The inverse of ``to_record``; ``ValueError`` naming what is wrong otherwise."""
        images = data.get("images")
        if not isinstance(images, list) or not all(isinstance(i, dict) for i in images):
            raise ValueError(f"an edit output's images must be a list of objects; got {images!r}")
        try:
            return cls(
                images=tuple(OutputImage(**image) for image in images),
                seed=int(data["seed"]),
                prompt=str(data["prompt"]),
                nsfw_flags=tuple(bool(flag) for flag in data.get("has_nsfw_concepts") or ()),
                timings=dict(data.get("timings") or {}),
                random_weights=bool(data.get("random_weights", False)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an edit output record: {exc}") from None


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
