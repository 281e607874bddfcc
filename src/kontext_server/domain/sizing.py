"""Output and reference sizes for FLUX.1 Kontext, as BFL's reference code picks them (no torch).

Kontext was trained on 17 resolutions of about one megapixel. An edit's output takes the bucket
nearest to the (first) input's aspect ratio; a caller-given ``aspect_ratio`` ("W:H", from 21:9
to 9:21) is used at ~1 MP instead. fal's [dev] endpoint can also ask for the input's own size
(``match_input``: scaled down to at most ``MATCH_INPUT_MAX_PX``). With no input at all
(text-to-image) the output is ``aspect_ratio`` (default 1:1) at ~1 MP. Every side is a
multiple of 16 (VAE factor 8 x 2x2 packing).

Several references ("multi") are each resized to their own bucket and then scaled down together
so that their pixels stay within a budget, and are tiled on one virtual canvas
(:func:`reference_offsets`, ComfyUI's "offset" scheme).

Sizes are ``(width, height)`` tuples everywhere in this module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from kontext_server.domain.errors import InputError

__all__ = [
    "MATCH_INPUT_MAX_PX",
    "MAX_ASPECT_RATIO",
    "MIN_ASPECT_RATIO",
    "ONE_MEGAPIXEL",
    "PREFERRED_KONTEXT_RESOLUTIONS",
    "SIDE_MULTIPLE_PX",
    "TEXT_TO_IMAGE_ASPECT_RATIO",
    "nearest_bucket",
    "output_size",
    "parse_aspect_ratio",
    "reference_offsets",
    "reference_sizes",
    "scale_to_area",
    "size_for_aspect",
    "text_to_image_size",
]

Size = tuple[int, int]

# (width, height); the same list as diffusers' pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS
# (a unit test keeps them equal), copied so that the API process needs no diffusers.
PREFERRED_KONTEXT_RESOLUTIONS: tuple[Size, ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)

ONE_MEGAPIXEL = 1024 * 1024
SIDE_MULTIPLE_PX = 16
MAX_ASPECT_RATIO = 21 / 9
MIN_ASPECT_RATIO = 9 / 21
# match_input keeps the input's size up to this many pixels (ours: fal says only "within
# supported limits"); larger inputs are scaled down, keeping their aspect.
MATCH_INPUT_MAX_PX = 2 * ONE_MEGAPIXEL
TEXT_TO_IMAGE_ASPECT_RATIO = "1:1"  # fal's default for the text-to-image endpoints

_ASPECT_RE = re.compile(r"^\s*(\d{1,5})\s*:\s*(\d{1,5})\s*$")
_ALLOWED_ASPECTS = "a ratio 'W:H' of positive integers between 21:9 and 9:21 (e.g. '16:9')"


def parse_aspect_ratio(text: str) -> Size:
    """Parse ``"W:H"`` into ``(W, H)``; raise ``InputError`` unless 9:21 <= W/H <= 21:9.

    Cheap and torch-free, so the HTTP layer can validate requests with it.
    """
    match = _ASPECT_RE.match(text)
    if match is None:
        raise InputError(f"aspect_ratio {text!r} is not {_ALLOWED_ASPECTS}")
    width, height = int(match.group(1)), int(match.group(2))
    if width == 0 or height == 0:
        raise InputError(f"aspect_ratio {text!r} is not {_ALLOWED_ASPECTS}")
    # Compare with integer cross-multiplication so that exactly 21:9 and 9:21 are allowed.
    if width * 9 > height * 21 or width * 21 < height * 9:
        raise InputError(f"aspect_ratio {text!r} is out of range: use {_ALLOWED_ASPECTS}")
    return width, height


def nearest_bucket(width: int, height: int) -> Size:
    """The preferred Kontext resolution nearest in aspect to ``width x height``.

    Ties break as diffusers breaks them (smallest difference, then smallest width).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    _, bucket_w, bucket_h = min(
        (abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS
    )
    return bucket_w, bucket_h


def size_for_aspect(aspect_w: int, aspect_h: int, area_px: int = ONE_MEGAPIXEL) -> Size:
    """``aspect_w:aspect_h`` at about ``area_px`` pixels, sides floored to multiples of 16.

    This is the rule diffusers applies to ``height``/``width``/``max_area``.
    """
    aspect = aspect_w / aspect_h
    width = round(math.sqrt(area_px * aspect))
    height = round(math.sqrt(area_px / aspect))
    return _floor_side(width), _floor_side(height)


def scale_to_area(width: int, height: int, area_px: int) -> Size:
    """Scale ``width x height`` down (never up) to at most ``area_px`` pixels, keeping the
    aspect; sides floored to multiples of 16 (and at least 16)."""
    factor = min(1.0, math.sqrt(area_px / (width * height)))
    return _floor_side(width * factor), _floor_side(height * factor)


def output_size(
    input_width: int,
    input_height: int,
    aspect_ratio: str | None = None,
    *,
    match_input: bool = False,
    area_px: int | None = None,
) -> Size:
    """The size of an edit's output for an input of ``input_width x input_height``.

    No ``aspect_ratio``: the nearest preferred bucket. With ``"W:H"``: that ratio at ~1 MP.
    ``match_input`` (no ``aspect_ratio`` with it): the input's own size, sides floored to
    multiples of 16, scaled down to at most ``MATCH_INPUT_MAX_PX``. ``area_px`` (tests, small
    previews) scales the result down to that many pixels; ``None`` keeps the real sizes.
    Raises ``InputError`` for a bad ``aspect_ratio`` or one given with ``match_input``.
    """
    if match_input and aspect_ratio is not None:
        raise InputError(
            f"aspect_ratio {aspect_ratio!r} and match_input both set the output size; give one"
        )
    if match_input:
        width, height = scale_to_area(input_width, input_height, MATCH_INPUT_MAX_PX)
    elif aspect_ratio is None:
        width, height = nearest_bucket(input_width, input_height)
    else:
        width, height = size_for_aspect(*parse_aspect_ratio(aspect_ratio))
    if area_px is not None:
        width, height = scale_to_area(width, height, area_px)
    return width, height


def text_to_image_size(aspect_ratio: str | None = None, *, area_px: int | None = None) -> Size:
    """The output size with no input image: ``aspect_ratio`` (default 1:1) at ~1 MP, then
    scaled down to ``area_px`` if given. Raises ``InputError`` for a bad ``aspect_ratio``."""
    ratio = TEXT_TO_IMAGE_ASPECT_RATIO if aspect_ratio is None else aspect_ratio
    width, height = size_for_aspect(*parse_aspect_ratio(ratio))
    if area_px is not None:
        width, height = scale_to_area(width, height, area_px)
    return width, height


def reference_sizes(
    sizes: Sequence[Size], *, budget_px: int, area_px: int | None = None
) -> list[Size]:
    """The size each reference image is resized to before VAE encoding.

    Each goes to its own bucket (scaled to ``area_px`` if given); if together they exceed
    ``budget_px`` pixels, all are scaled by the same factor (sides floored to multiples of 16),
    so the total never exceeds the budget while each keeps its aspect.
    """
    buckets = [output_size(w, h, area_px=area_px) for w, h in sizes]
    total_px = sum(w * h for w, h in buckets)
    if total_px <= budget_px:
        return buckets
    factor = math.sqrt(budget_px / total_px)
    return [(_floor_side(w * factor), _floor_side(h * factor)) for w, h in buckets]


def reference_offsets(token_sizes: Sequence[Size]) -> list[Size]:
    """``(y_offset, x_offset)`` of each reference on the virtual canvas, in tokens.

    ComfyUI's "offset" scheme: each next reference is placed right of the canvas so far or
    below it, whichever keeps the canvas squarer. ``token_sizes`` are ``(width, height)`` in
    tokens (pixels / 16).
    """
    canvas_w = canvas_h = 0
    offsets: list[Size] = []
    for width, height in token_sizes:
        y_offset = x_offset = 0
        if height + canvas_h > width + canvas_w:
            x_offset = canvas_w
        else:
            y_offset = canvas_h
        canvas_h = max(canvas_h, height + y_offset)
        canvas_w = max(canvas_w, width + x_offset)
        offsets.append((y_offset, x_offset))
    return offsets


def _floor_side(side_px: float) -> int:
    return max(SIDE_MULTIPLE_PX, int(side_px) // SIDE_MULTIPLE_PX * SIDE_MULTIPLE_PX)
