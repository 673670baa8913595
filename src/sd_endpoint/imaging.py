"""Encoding generated images for the wire."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

# PNG level 1: a 768x768 image encodes in a fraction of the time of the default level 6, for ~10% more bytes.
_SAVE_OPTIONS: dict[str, dict[str, object]] = {
    "png": {"format": "PNG", "compress_level": 1},
    "jpeg": {"format": "JPEG", "quality": 95},
    "webp": {"format": "WEBP", "quality": 90},
}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(image: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    image.save(buf, **_SAVE_OPTIONS[fmt])  # type: ignore[arg-type]
    return buf.getvalue()


def to_base64(data: bytes) -> str:
    """Standard base64 with no line breaks, as Azure's clients decode it."""
    return base64.b64encode(data).decode("ascii")
