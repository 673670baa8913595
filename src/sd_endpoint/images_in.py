"""Input images for image-to-image and inpainting: base64 text to checked, decoded PIL images.

Order of the checks, cheapest and safest first: the base64 length (before decoding it), the format and
pixel count from the image header (before decoding the pixels: a small file can declare billions of
pixels, a "decompression bomb"), then the pixels themselves. Every failure is an ``ImageInputError``
whose message the contract prefixes with the row and field.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL_PREFIX = "data:"


class ImageInputError(ValueError):
    """An input image that cannot be used; the message says why and names the limit's setting."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int  # decoded bytes of one image (SD_ENDPOINT_MAX_IMAGE_BYTES)
    max_pixels: int  # width x height of one input image, read from its header (SD_ENDPOINT_MAX_INPUT_PIXELS)


def decode_base64(text: str, limits: ImageLimits) -> bytes:
    """Standard base64 (line breaks allowed, as ``base64.encodebytes`` writes them), or a data: URL."""
    if text.startswith(("https://", "http://")):
        raise ImageInputError(
            "image URLs are not fetched by this endpoint; send the image itself as base64 (PNG, JPEG or WebP)"
        )
    if text.startswith(_DATA_URL_PREFIX):
        header, sep, payload = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ImageInputError("a data: URL must be of the form data:image/png;base64,<base64>")
        text = payload
    # 4 characters carry 3 bytes: refuse an oversized image before decoding it.
    estimate = len(text) * 3 // 4
    if estimate > limits.max_bytes + 3:
        raise ImageInputError(
            f"image is about {estimate} bytes; the limit is {limits.max_bytes} bytes (SD_ENDPOINT_MAX_IMAGE_BYTES)"
        )
    compact = "".join(text.split()) if _has_space(text) else text
    if not compact:
        raise ImageInputError("is empty; expected a base64-encoded PNG, JPEG or WebP image")
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("is not valid base64; expected a base64-encoded PNG, JPEG or WebP image") from None
    check_size(data, limits)
    return data


def _has_space(text: str) -> bool:
    return any(c in text for c in "\n\r\t ")


def check_size(data: bytes, limits: ImageLimits) -> None:
    if len(data) > limits.max_bytes:
        raise ImageInputError(
            f"image is {len(data)} bytes; the limit is {limits.max_bytes} bytes (SD_ENDPOINT_MAX_IMAGE_BYTES)"
        )


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Read the header, check format and pixel count, then decode the pixels (first frame)."""
    check_size(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageInputError(_too_many_pixels(None, limits)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageInputError("is not a PNG, JPEG or WebP image") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageInputError(_too_many_pixels((width, height), limits))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ImageInputError(f"is a {image.format} image whose data is truncated or corrupt") from None
    # Phone cameras store the orientation in EXIF; the pixels must be upright for the model.
    upright = ImageOps.exif_transpose(image)
    return upright if upright is not None else image


def _too_many_pixels(size: tuple[int, int] | None, limits: ImageLimits) -> str:
    declared = f" declares {size[0]}x{size[1]} = {size[0] * size[1]} pixels;" if size else " declares too many pixels;"
    return f"image{declared} the limit is {limits.max_pixels} (SD_ENDPOINT_MAX_INPUT_PIXELS); it was not decoded"


def as_rgb(image: Image.Image) -> Image.Image:
    """The model's input: RGB, alpha dropped (as diffusers' image processor does)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def as_mask(image: Image.Image) -> Image.Image:
    """A single-channel mask (white = repaint). Colour masks are refused: which channel would mean what?"""
    if image.mode in ("1", "L"):
        return image.convert("L")
    if image.mode in ("LA", "La"):
        return image.getchannel("L")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise ImageInputError(f"has {image.mode} pixels (16/32-bit); a mask must be an 8-bit black-and-white image")
    rgb = image.convert("RGB")
    r, g, b = rgb.split()
    # Equal channels everywhere: a grey image stored as RGB(A), as drawing tools save masks.
    if r.tobytes() != g.tobytes() or r.tobytes() != b.tobytes():
        raise ImageInputError(
            "is a colour image; a mask must be single-channel (black = keep, white = repaint), e.g. a grayscale PNG"
        )
    return r


def resized(image: Image.Image, width: int, height: int) -> Image.Image:
    """Lanczos, as diffusers' image processor resizes (a no-op at the same size)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)
