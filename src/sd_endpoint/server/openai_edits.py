"""What ``POST /v1/images/edits`` reads beyond the generation fields: OpenAI's multipart form (``image``, one
file; optional ``mask``; the text fields as typed values), and OpenAI's mask convention.

OpenAI's mask marks the area to repaint with transparency (alpha 0); such a mask becomes the contract's
white-means-repaint mask (255 - alpha). A mask with no transparency is passed on as it is, in the contract's own
convention (white = repaint).
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from sd_endpoint import images_in
from sd_endpoint.errors import UnsupportedMediaType
from sd_endpoint.imaging import encode_image
from sd_endpoint.server.openai_schema import EditsRequest, OpenAIError

# Multipart fields arrive as text; these are read as numbers (anything else is left to the model's types).
_INT_FIELDS = frozenset({"n", "seed", "steps"})
_FLOAT_FIELDS = frozenset({"guidance_scale", "strength"})
_FILE_FIELDS = {"image": "image", "image[]": "image", "mask": "mask"}


async def read_form(headers: Any, raw: bytes) -> tuple[dict[str, str], dict[str, bytes]]:
    """The multipart body (already read within the size limit) as text fields and file parts."""
    media_type = (headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if media_type != "multipart/form-data":
        raise UnsupportedMediaType(
            f"Content-Type must be multipart/form-data with the image as a file part (got {media_type or 'none'!r})."
        )

    async def once() -> Any:
        yield raw

    try:
        form = await MultiPartParser(headers, once(), max_files=4, max_fields=64).parse()
    except MultiPartException as exc:
        raise OpenAIError(f"The multipart body could not be read: {exc.message}.") from None
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for key, value in form.multi_items():
        name = _FILE_FIELDS.get(key, key)
        if name in fields or name in files:
            raise OpenAIError(f"{name}: given more than once; this server edits one image per request.", param=name)
        if isinstance(value, UploadFile):
            if key not in _FILE_FIELDS:
                raise OpenAIError(f"{key}: a file was sent where text was expected.", param=key)
            files[name] = await value.read()
        elif name in ("image", "mask"):
            raise OpenAIError(f"{name}: must be a file part (an uploaded image), not text.", param=name)
        else:
            fields[name] = value
    if "image" not in files:
        raise OpenAIError("image: is required (a PNG, JPEG or WebP file part).", param="image")
    return fields, files


def typed_fields(fields: dict[str, str]) -> dict[str, Any]:
    """Multipart text to the JSON types the request model checks (numbers for the numeric fields)."""
    out: dict[str, Any] = dict(fields)
    for name, text in fields.items():
        kind = int if name in _INT_FIELDS else float if name in _FLOAT_FIELDS else None
        if kind is None:
            continue
        try:
            out[name] = kind(text.strip())
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise OpenAIError(f"{name}: must be {expected} (got {text[:40]!r}).", param=name) from None
    return out


def openai_mask(data: bytes, limits: images_in.ImageLimits) -> bytes:
    """OpenAI's mask (transparent = repaint) as the contract's (white = repaint); other masks pass unchanged."""
    try:
        image = images_in.open_image(data, limits)  # format and pixel count checked before decoding
    except images_in.ImageInputError as exc:
        raise OpenAIError(f"mask: {exc}.", param="mask") from None
    if image.mode not in ("RGBA", "LA", "PA", "La", "RGBa") and "transparency" not in image.info:
        return data
    alpha = image.convert("RGBA").getchannel("A")
    low, _ = alpha.getextrema()
    if low == 255:  # fully opaque: no transparency marks anything; read it as the contract's convention
        return data
    return encode_image(alpha.point(lambda a: 255 - a), "png")


# The form as the API description shows it (FastAPI cannot derive a multipart body read by hand).
EDITS_SCHEMA = {
    "type": "object",
    "required": ["image", "prompt"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "The image to edit (PNG, JPEG or WebP)."},
        "mask": {
            "type": "string",
            "format": "binary",
            "description": "Transparent (alpha 0) where to repaint, as OpenAI's; without transparency, white = "
            "repaint. Same size as the image. Without a mask: image-to-image.",
        },
        **{
            name: schema
            for name, schema in EditsRequest.model_json_schema()["properties"].items()
            if name not in ("image", "mask")
        },
    },
}
