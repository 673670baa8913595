"""Between OpenAI's images API and the contract: an OpenAI request as one contract request (one row with
``n`` images), the contract's 400 with OpenAI's field names, and the contract's records as OpenAI's
``ImagesResponse`` (blocked images listed apart, with their reason)."""

from __future__ import annotations

import base64
import io
import re
import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from sd_endpoint.errors import InvalidRequest
from sd_endpoint.server.openai_schema import ContentBlocked, EditsRequest, GenerationsRequest, OpenAIError

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")

# The contract's names in its error messages, and the OpenAI field the client actually sent.
# (pattern in the contract's message, replacement, the OpenAI ``param``); the first match names the param.
_CONTRACT_NAMES: tuple[tuple[re.Pattern[str], str, str | None], ...] = (
    (re.compile(r"(?:input_data\.)?parameters\.height x width"), "size", "size"),
    (re.compile(r"(?:input_data\.)?parameters\.height\b"), "size (height)", "size"),
    (re.compile(r"(?:input_data\.)?parameters\.width\b"), "size (width)", "size"),
    (re.compile(r"(?:input_data\.)?parameters\.num_inference_steps\b"), "steps", "steps"),
    (re.compile(r"(?:input_data\.)?parameters\.num_images_per_prompt\b"), "n", "n"),
    (re.compile(r"\bnum_images_per_prompt\b"), "n", "n"),
    (re.compile(r"input_data\.data\[0\]\.mask_image\b"), "mask", "mask"),
    (re.compile(r"(?:input_data\.)?parameters\.(\w+)"), r"\1", None),
    (re.compile(r"input_data\.data\[0\]\.(\w+)"), r"\1", None),
    (re.compile(r"input_data\.data\[0\]: "), "", None),
    (re.compile(r"\bnum_inference_steps\b"), "steps", None),
    (re.compile(r"\bmask_image\b"), "mask", None),
)


def to_contract(req: GenerationsRequest, image: bytes | None = None, mask: bytes | None = None) -> dict[str, Any]:
    """The contract request for an OpenAI request: one row, ``n`` images (with the edit's image and mask)."""
    params: dict[str, Any] = {"num_images_per_prompt": req.n}
    if req.size is not None and req.size.strip().lower() != "auto":
        match = _SIZE.match(req.size)
        if match is None:
            raise OpenAIError(
                f'size: must be "WIDTHxHEIGHT" such as "512x512", or "auto" (got {req.size!r}).', param="size"
            )
        params["width"], params["height"] = int(match.group(1)), int(match.group(2))
    optional = {
        "num_inference_steps": req.steps,
        "guidance_scale": req.guidance_scale,
        "negative_prompt": req.negative_prompt,
        "seed": req.seed,
        "scheduler": req.scheduler,
        "output_format": req.output_format,
        "strength": req.strength if isinstance(req, EditsRequest) else None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    row: dict[str, Any] = {"prompt": req.prompt}
    if image is not None:
        row["image"] = base64.b64encode(image).decode("ascii")
    if mask is not None:
        row["mask_image"] = base64.b64encode(mask).decode("ascii")
    return {"input_data": {"columns": list(row), "data": [row], "index": [0]}, "parameters": params}


def from_contract_error(exc: InvalidRequest) -> OpenAIError:
    """The contract's 400, with its field names turned into the ones the OpenAI client sent."""
    message = exc.message
    param: str | None = None
    for pattern, replacement, name in _CONTRACT_NAMES:
        found = pattern.search(message)
        if found is None:
            continue
        if param is None:
            param = name if name is not None else (found.group(1) if pattern.groups else None)
        message = pattern.sub(replacement, message)
    return OpenAIError(message, param=param)


def _reason(blocked: dict[str, Any]) -> str:
    stage = blocked.get("stage", "content")
    parts = [f"{name} (severity {level})" for name, level in dict(blocked.get("categories") or {}).items()]
    parts += [f"blocklist {name}" for name in blocked.get("blocklists") or []]
    return f"{stage} stage: {', '.join(parts) or 'blocked'}"


def to_images_response(
    records: list[dict[str, Any]], output_format: str, size: str, url_of: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """OpenAI's ImagesResponse for the contract's records; blocked images are listed apart, with their reason.

    ``url_of`` (response_format "url") turns an image's base64 into a download URL.
    """
    data: list[dict[str, Any]] = []
    blocked: list[dict[str, Any]] = []
    for record in records:
        if record.get("blocked"):
            blocked.append({"seed": record["seed"], "reason": _reason(record["blocked"]), **record["blocked"]})
            continue
        image = record["generated_image"]
        item: dict[str, Any] = {"url": url_of(image)} if url_of else {"b64_json": image}
        item["seed"] = record["seed"]
        if record.get("warnings"):
            item["warnings"] = record["warnings"]
        data.append(item)
    if not data:
        reasons = "; ".join(sorted({b["reason"] for b in blocked}))
        raise ContentBlocked(f"Content screening blocked every image of this request ({reasons}).")
    body: dict[str, Any] = {"created": int(time.time()), "data": data, "output_format": output_format, "size": size}
    if blocked:
        body["blocked"] = blocked
    return body


def size_of(records: list[dict[str, Any]], params: dict[str, Any]) -> str:
    """The size asked for, or (for "auto") the size the first image came out at, read from its header."""
    if "width" in params:
        return f"{params['width']}x{params['height']}"
    for record in records:
        if record.get("generated_image"):
            with Image.open(io.BytesIO(base64.b64decode(record["generated_image"]))) as image:
                return f"{image.width}x{image.height}"
    return "auto"
