"""Untrusted image bytes decode to RGB or fail with a clear ImageDecodeError."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from kontext_server.domain.errors import ImageDecodeError, InputError
from kontext_server.worker.imaging import decode_image, encode_image

MAX_PIXELS = 40_000_000


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def test_rgb_jpeg_decodes_unchanged_in_size() -> None:
    image = decode_image(
        _save(Image.new("RGB", (40, 30), (10, 200, 30)), "JPEG"), max_pixels=MAX_PIXELS
    )
    assert (image.mode, image.size) == ("RGB", (40, 30))


def test_rgba_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    image = decode_image(_save(rgba, "PNG"), max_pixels=MAX_PIXELS)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((5, 5)) == (255, 255, 255)


def test_grayscale_and_la_become_rgb() -> None:
    gray = decode_image(_save(Image.new("L", (4, 4), 77), "PNG"), max_pixels=MAX_PIXELS)
    assert gray.mode == "RGB"
    assert gray.getpixel((1, 1)) == (77, 77, 77)
    la = decode_image(_save(Image.new("LA", (4, 4), (77, 0)), "PNG"), max_pixels=MAX_PIXELS)
    assert la.getpixel((1, 1)) == (255, 255, 255)


def test_palette_with_transparency_is_composited_on_white() -> None:
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    data = _save(palette, "PNG", transparency=0)
    image = decode_image(data, max_pixels=MAX_PIXELS)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((2, 2)) == (0, 0, 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    samples = np.array([[0, 257 * 128], [65535, 1000]], dtype=np.uint16)
    data = _save(Image.fromarray(samples), "PNG")
    image = decode_image(data, max_pixels=MAX_PIXELS)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((1, 0)) == (128, 128, 128)
    assert image.getpixel((0, 1)) == (255, 255, 255)
    assert image.getpixel((1, 1)) == (4, 4, 4)


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")
    image = decode_image(data, max_pixels=MAX_PIXELS)
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((8, 8))  # type: ignore[misc]
    assert red > 200
    assert green < 60
    assert blue < 60


def test_exif_orientation_is_applied() -> None:
    original = Image.new("RGB", (40, 20), (0, 0, 0))
    original.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = decode_image(_save(original, "JPEG", exif=exif), max_pixels=MAX_PIXELS)
    assert image.size == (20, 40)
    assert sum(image.getpixel((10, 5))) > 600  # type: ignore[arg-type]  # white now on top
    assert sum(image.getpixel((10, 35))) < 100  # type: ignore[arg-type]


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    image = decode_image(buffer.getvalue(), max_pixels=MAX_PIXELS)
    assert image.getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "AVIF"])
def test_other_allowed_formats_decode(fmt: str) -> None:
    from PIL import features

    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    image = decode_image(_save(Image.new("RGB", (16, 16), (0, 128, 0)), fmt), max_pixels=MAX_PIXELS)
    assert image.size == (16, 16)


def test_too_many_pixels_is_rejected_before_decoding() -> None:
    data = _save(Image.new("RGB", (200, 100)), "PNG")
    with pytest.raises(ImageDecodeError, match=r"too large .*; at most 15,000 pixels are allowed"):
        decode_image(data, max_pixels=15_000)


def _png_claiming_size(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size but whose data is tiny (a decompression bomb)."""
    data = bytearray(_save(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_decompression_bomb_is_rejected_with_clear_error() -> None:
    with pytest.raises(ImageDecodeError, match="at most 40,000,000 pixels"):
        decode_image(_png_claiming_size(100_000, 100_000), max_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"definitely not an image", "not a JPEG, PNG, WebP, GIF, AVIF or BMP"),
    ],
)
def test_empty_and_garbage_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data, max_pixels=MAX_PIXELS)


def test_truncated_file_is_rejected_with_clear_error() -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = _save(Image.fromarray(noise), "PNG")
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], max_pixels=MAX_PIXELS)


def test_tiff_is_outside_the_allow_list() -> None:
    data = _save(Image.new("RGB", (8, 8)), "TIFF")
    with pytest.raises(ImageDecodeError, match="not a JPEG, PNG, WebP, GIF, AVIF or BMP") as info:
        decode_image(data, max_pixels=MAX_PIXELS)
    assert isinstance(info.value, InputError)


def test_encode_is_deterministic_and_reports_size() -> None:
    noise = np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    for fmt, content_type in (("jpeg", "image/jpeg"), ("png", "image/png")):
        first = encode_image(image, fmt)  # type: ignore[arg-type]
        assert first == encode_image(image, fmt)  # type: ignore[arg-type]
        assert (first.width, first.height, first.content_type) == (32, 24, content_type)
        assert Image.open(io.BytesIO(first.data)).size == (32, 24)
    png = encode_image(image, "png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.data))), noise)
