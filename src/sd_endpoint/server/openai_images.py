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
same extras, plus ``strength``; OpenAI's transparent-means-repaint mask is turned into the contract's.

This module is the routes: the request models and error body are ``openai_schema``, the translation to and
from the contract ``openai_translate``, the edit's form and mask ``openai_edits``.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.routing import Match

from sd_endpoint import images_in
from sd_endpoint.errors import EndpointError, InvalidRequest, ServiceUnavailable
from sd_endpoint.imaging import MEDIA_TYPES
from sd_endpoint.request_parsing import decode_body
from sd_endpoint.server.body import check_content_type, read_body
from sd_endpoint.server.image_store import ImageStore
from sd_endpoint.server.middleware import STATE_KEY
from sd_endpoint.server.openai_edits import EDITS_SCHEMA, openai_mask, read_form, typed_fields
from sd_endpoint.server.openai_schema import EditsRequest, GenerationsRequest, OpenAIError, error_body, validate_request
from sd_endpoint.server.openai_translate import from_contract_error, size_of, to_contract, to_images_response
from sd_endpoint.server.routes import run_score

GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
FILES_PATH = "/v1/images/files"


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
    req = validate_request(decode_body(raw))
    return await _run(request, req, to_contract(req))


@router.post(
    EDITS_PATH,
    summary="Edit an image: image-to-image, or inpainting with a mask (OpenAI-compatible)",
    operation_id="OpenAIImagesEdits",
    openapi_extra={
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": EDITS_SCHEMA}}},
        "security": [{"Bearer": []}],
    },
)
async def edits(request: Request) -> Response:
    state = request.app.state.sd
    state.keys.check(request.headers.get("authorization"))
    raw = await read_body(request, state.settings.max_body_bytes)
    fields, files = await read_form(request.headers, raw)
    req = validate_request(typed_fields(fields), EditsRequest)
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
    size = size_of(result.records, contract["parameters"])
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
