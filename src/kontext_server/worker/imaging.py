"""Decoding untrusted input images and encoding outputs (Pillow only, no torch).

:func:`decode_image` is the one door for image bytes from callers: an allow-list of formats
checked from the header, a pixel cap checked before any pixel is decoded (and Pillow's
decompression-bomb warning turned into an error), EXIF orientation applied, and every mode
converted to 8-bit RGB (transparency composited on white). Every failure is an
``ImageDecodeError`` whose message says what was wrong and what is allowed.
"""

from __future__ import annotations

import io
import warnings
from typing import Final

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from kontext_server.domain.editing import EncodedImage, OutputFormat
from kontext_server.domain.errors import ImageDecodeError

__all__ = [
    "ALLOWED_FORMATS",
    "JPEG_QUALITY",
    "MAX_ASPECT_RATIO",
    "decode_image",
    "encode_image",
    "to_rgb",
]

# Pillow plugin names (the JPEG plugin also opens the multi-picture "MPO" JPEGs phones write).
ALLOWED_FORMATS: Final = ("JPEG", "PNG", "WEBP", "GIF", "AVIF", "BMP")
_ALLOWED_TEXT: Final = "JPEG, PNG, WebP, GIF, AVIF or BMP"
JPEG_QUALITY: Final = 95
# Longer side / shorter side. Kontext works at 21:9..9:21; anything past 20:1 is a sliver that
# only costs memory (1 x 40,000 passes the pixel cap) and cannot be edited sensibly.
MAX_ASPECT_RATIO: Final = 20
_WHITE: Final = (255, 255, 255)
_SIXTEEN_BIT_MODES: Final = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})

# A truncated file must fail, never come back half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's bomb warning becomes an error for the whole process, once: a per-call
# ``warnings.catch_warnings`` is not thread-safe, and workers decode in a thread pool.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode untrusted ``data`` into a loaded RGB image (the first frame if animated).

    Raises ``ImageDecodeError`` for empty, corrupt or truncated data, a format outside
    JPEG/PNG/WebP/GIF/AVIF/BMP, more than ``max_pixels`` pixels or a longer side more than
    ``MAX_ASPECT_RATIO`` times the shorter (both checked from the header, before decoding).
    Sets Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` to ``max_pixels`` as a second line
    of defence, so callers in one process should share one cap.
    """
    if not data:
        raise ImageDecodeError("the image is empty (0 bytes)")
    Image.MAX_IMAGE_PIXELS = max_pixels
    image = _open_allowed(data, max_pixels=max_pixels)
    _load_first_frame(image)
    image = _apply_exif_orientation(image)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha and palette transparency are composited on
    white, 16/32-bit grayscale is scaled (not clipped) to 8 bits, CMYK goes through Pillow."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if _has_transparency(image):
        return _composite_on_white(image.convert("RGBA"))
    return image.convert("RGB")


def encode_image(image: Image.Image, fmt: OutputFormat) -> EncodedImage:
    """Encode an RGB image as JPEG (quality 95) or PNG; equal inputs give equal bytes."""
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        content_type = "image/jpeg"
    elif fmt == "png":
        image.save(buffer, format="PNG")
        content_type = "image/png"
    else:
        raise ValueError(f"output format {fmt!r} is not supported; use 'jpeg' or 'png'")
    return EncodedImage(
        data=buffer.getvalue(),
        width=image.width,
        height=image.height,
        content_type=content_type,
    )


def _open_allowed(data: bytes, *, max_pixels: int) -> Image.Image:
    """Identify the format from the header (only allowed plugins are tried) and check the
    pixel count before anything is decoded."""
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"the data is not a {_ALLOWED_TEXT} image, or it is corrupt; send one of those formats"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(str(exc), max_pixels) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"the image header is corrupt: {exc}") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"the image has an empty size ({width}x{height})")
    if width * height > max_pixels:
        raise _too_many_pixels(f"{width}x{height} = {width * height:,} pixels", max_pixels)
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageDecodeError(
            f"the image's aspect ratio is absurd ({width}x{height}); the longer side may be at "
            f"most {MAX_ASPECT_RATIO} times the shorter one"
        )
    return image


def _load_first_frame(image: Image.Image) -> None:
    """Decode frame 0 (animated GIF/WebP: the first frame); map every decoder failure."""
    try:
        image.seek(0)
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(str(exc), Image.MAX_IMAGE_PIXELS or 0) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise ImageDecodeError(
            f"the {image.format} image is truncated or corrupt ({exc}); send a complete file"
        ) from exc


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as exc:
        raise ImageDecodeError(f"the image's EXIF data is corrupt ({exc})") from exc


def _too_many_pixels(detail: str, max_pixels: int) -> ImageDecodeError:
    return ImageDecodeError(
        f"the image is too large ({detail}); at most {max_pixels:,} pixels are allowed"
    )


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit grayscale (Pillow's ``I;16*``, or ``I`` holding 16-bit PNG samples) to 8 bits by
    scaling 0..65535 onto 0..255; Pillow's own convert would clip everything above 255."""
    samples = np.asarray(image, dtype=np.float64)
    eight_bit = np.clip(np.rint(samples / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(eight_bit).convert("RGB")
