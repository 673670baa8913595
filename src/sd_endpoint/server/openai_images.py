"""OpenAI-compatible images API: ``POST /v1/images/generations`` and ``POST /v1/images/edits``.

A translator only. The OpenAI request becomes one contract request (one row with ``n`` images; for edits the
row carries the uploaded ``image`` and ``mask`` as the contract's ``image`` and ``mask_image``) and takes the
same entry as ``/score`` (``routes.run_score``: readiness, admission, micro-batching, screening, timeout,
metrics, the log line); the records come back as OpenAI's ``ImagesResponse``. Authentication is the same
``Authorization: Bearer <key>`` check. Errors keep their status but use OpenAI's body,
``{"error": {"message", "type", "param", "code"}}``, so that OpenAI SDKs raise their own exception types
with our message.

Names: OpenAI's own fields keep theirs (``prompt``, ``n``, ``size`` as ``"WIDTHxHEIGHT"``,
``response_format``, ``output_format``); our extras are ``negative_prompt``, ``seed``, ``steps``,
``guidance_scale`` and ``scheduler`` (send them with the SDK's ``extra_body``). ``model``, ``quality``,
``style``, ``moderation`` and ``user`` are accepted and ignored: one model is served. Each image of the answer
carries its ``seed``, so that it can be reproduced.

Edits are multipart, as OpenAI's: ``image`` (one file), optional ``mask``, ``prompt``, ``n``, ``size`` and the
same extras, plus ``strength``. OpenAI's mask marks the area to repaint with transparency (alpha 0); such a
mask becomes the contract's white-means-repaint mask (255 - alpha). A mask with no transparency is passed on
as it is, in the contract's own convention (white = repaint).
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.routing import Match

from sd_endpoint import images_in
from sd_endpoint.contract import OutputFormat, decode_body
from sd_endpoint.errors import EndpointError, InvalidRequest, ServiceUnavailable, UnsupportedMediaType
from sd_endpoint.imaging import MEDIA_TYPES, encode_image
from sd_endpoint.jobs import SchedulerName
from sd_endpoint.server.body import check_content_type, read_body
from sd_endpoint.server.image_store import ImageStore
from sd_endpoint.server.middleware import STATE_KEY
from sd_endpoint.server.routes import run_score

GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
FILES_PATH = "/v1/images/files"
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")

# OpenAI's error "type" for each status we answer with.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
}
_ERROR_CODES = {401: "invalid_api_key", 413: "request_too_large", 429: "rate_limit_exceeded"}

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


class OpenAIError(InvalidRequest):
    """A 400 raised by the translation itself, naming the OpenAI field (``param``) and a machine ``code``."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class GenerationsRequest(BaseModel):
    """``POST /v1/images/generations``: OpenAI's fields, plus ours (negative_prompt, seed, steps, ...)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="What to draw.")
    n: int = Field(1, description="Images to generate (seeds seed, seed+1, ...).")
    size: str | None = Field(None, description='"WIDTHxHEIGHT", multiples of 8 (e.g. "512x512"), or "auto".')
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description='"b64_json" (the default), or "url" when SD_ENDPOINT_OPENAI_IMAGE_BASE_URL is set.'
    )
    output_format: OutputFormat | None = Field(None, description="png (default), jpeg or webp.")
    negative_prompt: str | None = Field(None, description="What to steer away from.")
    seed: int | None = Field(None, description="Seed of the first image; random when absent.")
    steps: int | None = Field(None, description="Denoising steps (num_inference_steps).")
    guidance_scale: float | None = Field(None, description="Classifier-free guidance scale.")
    scheduler: SchedulerName | None = Field(None, description="Sampler; the model's own (DDIM) when absent.")
    # Accepted so that unchanged OpenAI clients work, and ignored: one model is served, at one quality.
    model: str | None = Field(None, description="Ignored: the server has one model.")
    quality: str | None = Field(None, description="Ignored.")
    style: str | None = Field(None, description="Ignored.")
    moderation: str | None = Field(None, description="Ignored (content screening is the server's setting).")
    user: str | None = Field(None, description="Ignored.")


class EditsRequest(GenerationsRequest):
    """``POST /v1/images/edits`` (multipart): the text fields; ``image`` and ``mask`` are file parts."""

    strength: float | None = Field(None, description="How far from the input image, 0..1 (0.8).")


# Multipart fields arrive as text; these are read as numbers (anything else is left to the model's types).
_INT_FIELDS = frozenset({"n", "seed", "steps"})
_FLOAT_FIELDS = frozenset({"guidance_scale", "strength"})
_FILE_FIELDS = {"image": "image", "image[]": "image", "mask": "mask"}


# ------------------------------------------------------------------------------------------------
# Error rendering


def error_body(exc: EndpointError) -> dict[str, Any]:
    """OpenAI's error shape for one of our errors; the status code stays the same."""
    status = exc.status_code
    kind = _ERROR_TYPES.get(status, "server_error")
    return {
        "error": {
            "message": exc.body()["message"],  # the hierarchy's rendering (lone surrogates escaped)
            "type": kind,
            "param": getattr(exc, "param", None),
            "code": getattr(exc, "code", None) or _ERROR_CODES.get(status),
        }
    }


def _openai_response(request: Request, exc: EndpointError) -> JSONResponse:
    info = getattr(request.state, STATE_KEY, None)
    if isinstance(info, dict):
        info["error"] = exc.message
    return JSONResponse(error_body(exc), exc.status_code, headers=exc.headers)


class _OpenAIRoute(APIRoute):
    """A route whose errors are rendered in OpenAI's shape instead of the app's ``{"message"}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except EndpointError as exc:
                return _openai_response(request, exc)

        return handle


router = APIRouter(route_class=_OpenAIRoute)


# ------------------------------------------------------------------------------------------------
# Translation


def _validate(payload: Any, model: type[GenerationsRequest] = GenerationsRequest) -> GenerationsRequest:
    if not isinstance(payload, dict):
        raise OpenAIError("The request body must be a JSON object with a 'prompt'.")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(model.model_fields)
            raise OpenAIError(f"Unknown field '{field}'; allowed: {allowed}.", param=field) from None
        if err["type"] == "missing":
            raise OpenAIError(f"{field}: is required.", param=field) from None
        raise OpenAIError(f"{field}: {err['msg']}.", param=field) from None


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


class ContentBlocked(OpenAIError):
    """Every image was blocked by content screening: OpenAI answers that with a 400 of this code."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="content_policy_violation")


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


# ------------------------------------------------------------------------------------------------
# Routes


@router.post(
    GENERATIONS_PATH,
    summary="Generate images (OpenAI-compatible)",
    operation_id="OpenAIImagesGenerations",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": GenerationsRequest.model_json_schema()}},
        },
        "security": [{"Bearer": []}],
    },
)
async def generations(request: Request) -> Response:
    state = request.app.state.sd
    state.keys.check(request.headers.get("authorization"))
    check_content_type(request.headers.get("content-type"))
    raw = await read_body(request, state.settings.max_body_bytes)
    req = _validate(decode_body(raw))
    return await _run(request, req, to_contract(req))


_EDITS_SCHEMA = {
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


@router.post(
    EDITS_PATH,
    summary="Edit an image: image-to-image, or inpainting with a mask (OpenAI-compatible)",
    operation_id="OpenAIImagesEdits",
    openapi_extra={
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _EDITS_SCHEMA}}},
        "security": [{"Bearer": []}],
    },
)
async def edits(request: Request) -> Response:
    state = request.app.state.sd
    state.keys.check(request.headers.get("authorization"))
    raw = await read_body(request, state.settings.max_body_bytes)
    fields, files = await read_form(request.headers, raw)
    req = _validate(typed_fields(fields), EditsRequest)
    mask = files.get("mask")
    if mask is not None:
        limits = images_in.ImageLimits(state.settings.max_image_bytes, state.settings.max_input_pixels)
        # Decoding an image can take a while: off the event loop, as /score parses its input images.
        mask = await asyncio.to_thread(openai_mask, mask, limits)
    return await _run(request, req, to_contract(req, files["image"], mask))


async def _run(request: Request, req: GenerationsRequest, contract: dict[str, Any]) -> Response:
    """The contract request through /score's own entry; the records back as OpenAI's response."""
    settings = request.app.state.sd.settings
    base_url: str | None = settings.openai_image_base_url
    if req.response_format == "url" and base_url is None:
        raise OpenAIError(
            'response_format "url" is not supported here: the server keeps no images unless '
            'SD_ENDPOINT_OPENAI_IMAGE_BASE_URL is set. Use "b64_json" (the default) and decode the base64 image '
            "in each data item.",
            param="response_format",
            code="unsupported_response_format",
        )
    try:
        result = await run_score(request, contract)
    except InvalidRequest as exc:
        if exc.status_code != 400:  # 413 and friends are not about a field
            raise
        raise from_contract_error(exc) from None
    output_format = req.output_format or "png"
    size = _size_of(result.records, contract["parameters"])
    url_of = None
    if req.response_format == "url" and base_url is not None:
        url_of = _keeper(_store(request), base_url, output_format)
    body = to_images_response(result.records, output_format, size, url_of)
    return JSONResponse(body, headers=result.headers)


def _keeper(store: ImageStore, base_url: str, output_format: str) -> Callable[[str], str]:
    """Keeps each image in the store and gives its download URL."""

    def url_of(image: str) -> str:
        image_id = store.put(base64.b64decode(image), MEDIA_TYPES[output_format])
        if image_id is None:
            raise ServiceUnavailable("An image is larger than SD_ENDPOINT_OPENAI_IMAGE_STORE_BYTES; use b64_json.")
        return f"{base_url}{FILES_PATH}/{image_id}.{output_format}"

    return url_of


def _store(request: Request) -> ImageStore:
    """The app's image store, made on first use (only servers answering by URL have one)."""
    store: ImageStore | None = getattr(request.app.state, "openai_image_store", None)
    if store is None:
        settings = request.app.state.sd.settings
        store = ImageStore(settings.openai_image_ttl_s, settings.openai_image_store_bytes)
        request.app.state.openai_image_store = store
    return store


@router.get(
    FILES_PATH + "/{name}",
    summary="Download an image answered by URL (response_format url)",
    operation_id="OpenAIImagesFile",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}},
)
async def image_file(request: Request, name: str) -> Response:
    """No key: the unguessable name is the permission, as with OpenAI's image URLs. Gone after the TTL."""
    image_id, _, ext = name.partition(".")
    store: ImageStore | None = getattr(request.app.state, "openai_image_store", None)
    image = store.get(image_id) if store is not None else None
    if image is None or MEDIA_TYPES.get(ext) != image.media_type:
        raise _NotFound(f"{FILES_PATH}/{name[:80]} does not exist or has expired.")
    return Response(
        image.data,
        media_type=image.media_type,
        headers={"Cache-Control": "private, max-age=60", "X-Content-Type-Options": "nosniff"},
    )


def _size_of(records: list[dict[str, Any]], params: dict[str, Any]) -> str:
    """The size asked for, or (for "auto") the size the first image came out at, read from its header."""
    if "width" in params:
        return f"{params['width']}x{params['height']}"
    for record in records:
        if record.get("generated_image"):
            with Image.open(io.BytesIO(base64.b64decode(record["generated_image"]))) as image:
                return f"{image.width}x{image.height}"
    return "auto"


class _NotFound(EndpointError):
    status_code = 404


class _MethodNotAllowed(EndpointError):
    status_code = 405


@router.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"], include_in_schema=False)
async def not_served(request: Request) -> Response:
    """Unknown /v1 paths and wrong methods on ours: the usual 404/405, in OpenAI's error shape."""
    allowed = sorted(
        {
            method
            for route in router.routes
            if getattr(route, "endpoint", None) is not not_served and route.matches(request.scope)[0] != Match.NONE
            for method in (getattr(route, "methods", None) or ())
        }
    )
    if allowed:
        exc: EndpointError = _MethodNotAllowed(
            f"{request.method} is not allowed on {request.url.path}; use {', '.join(allowed)}.",
            headers={"Allow": ", ".join(allowed)},
        )
    else:
        exc = _NotFound(
            f"{request.url.path} is not served here; the images API is POST {GENERATIONS_PATH} and POST {EDITS_PATH}."
        )
    return _openai_response(request, exc)
