"""Image bytes as the skins take them in: their media type from their first bytes, and the
``data:`` URI that carries them in a job's input."""

from __future__ import annotations

import base64

__all__ = ["image_data_uri", "sniff_image_type"]

# Magic numbers of the image types the worker decodes (fetch.py allows the same media types).
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"BM", "image/bmp"),
)


def sniff_image_type(data: bytes) -> str | None:
    """The media type of image bytes from their first bytes (png, jpeg, gif, bmp, webp,
    avif), or ``None`` when they are none of these."""
    for offset, magic, media_type in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "image/avif"
    return None


def image_data_uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"
