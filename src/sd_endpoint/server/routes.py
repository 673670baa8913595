"""The routes. They only translate HTTP to the service and back; all model logic lives in the service."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from sd_endpoint import metrics
from sd_endpoint.batching import AdmissionControl, BatchClient
from sd_endpoint.contract import ErrorBody, ImageRecord, ScoreRequest, ScoringRequest
from sd_endpoint.errors import (
    EndpointError,
    GenerationCancelled,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from sd_endpoint.jobs import CancelToken
from sd_endpoint.server import openapi
from sd_endpoint.server.middleware import STATE_KEY
from sd_endpoint.service import GenerationService, ScoreResult

if TYPE_CHECKING:
    from sd_endpoint.server.app import ServerState

router = APIRouter()

# How often a waiting request looks whether its client is still connected.
DISCONNECT_POLL_S = 0.1
# After a refused body (413) we still read up to this much of it, so that the client gets the 413 rather
# than a connection reset (closing a socket with unread data resets it); bigger bodies are cut off.
_DRAIN_LIMIT = 8 * 1024 * 1024
# Log at most this many characters of each prompt (SD_ENDPOINT_LOG_PROMPTS).
_LOGGED_PROMPT_CHARS = 500


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.sd
    return state


def _log_info(request: Request) -> dict[str, Any]:
    info = getattr(request.state, STATE_KEY, None)
    return info if isinstance(info, dict) else {}


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description, **extra}


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
_RECORD_EXAMPLE = [
    {
        "prompt": "an astronaut riding a horse",
        "generated_image": "iVBORw0KGgoAAAANSUhEUgAA...",
        "nsfw_content_detected": None,
        "seed": 42,
        "index": 0,
    }
]
SCORE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": list[ImageRecord],
        "description": "One record per generated image, in input order.",
        "content": {"application/json": {"example": _RECORD_EXAMPLE}},
    },
    400: _error("Malformed JSON, or an invalid request: the message names the field and what it accepts."),
    401: _error(
        "Missing or wrong key (only when SD_ENDPOINT_KEYS is set).",
        headers={"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    ),
    408: _error("SD_ENDPOINT_REQUEST_TIMEOUT_MS passed; the generation stopped at its next denoising step."),
    413: _error("The body is larger than SD_ENDPOINT_MAX_BODY_BYTES."),
    415: _error("Content-Type is not application/json."),
    429: _error("Too many requests in flight and queued; retry after Retry-After seconds.", headers=_RETRY_AFTER),
    431: _error("An id header (x-request-id, x-ms-request-id, x-ms-client-request-id) is over 100 characters."),
    500: _error("Generation failed; the message gives the request id to look up in the server log."),
    503: _error(
        "The model is still loading or warming up, the server is shutting down, or content screening is unreachable.",
        headers=_RETRY_AFTER,
    ),
}
_REQUEST_EXAMPLES = {
    f"example{i + 1}": {"value": example}
    for i, example in enumerate(ScoreRequest.model_json_schema().get("examples", []))
}
SCORE_OPENAPI_EXTRA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The scoring request (pandas split orientation), as Azure ML clients send it.",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}, "examples": _REQUEST_EXAMPLES}
        },
    },
    "security": [{"Bearer": []}],
}


# ------------------------------------------------------------------------------------------------
# Probes


@router.get(
    "/",
    response_class=PlainTextResponse,
    summary="Liveness",
    operation_id="ServiceHealthCheck",
    responses={200: {"content": {"text/plain": {"example": "Healthy"}}}, 503: _error("The model failed to load.")},
)
async def liveness(request: Request) -> Response:
    """`Healthy` while the process can serve, including while the model loads."""
    state = _state(request)
    if state.phase == "failed":
        raise state.not_ready(detail=state.keys.allows(request.headers.get("authorization")))
    return PlainTextResponse("Healthy")


@router.get(
    "/ready",
    summary="Readiness",
    operation_id="Readiness",
    responses={
        200: {"description": "Loaded and warmed up: what was loaded and why.", "content": {"application/json": {}}},
        503: _error("Loading, warming up, failed, or shutting down.", headers=_RETRY_AFTER),
    },
)
async def readiness(request: Request) -> Response:
    """200 once the model is loaded and one warm-up generation has run; 503 before that and while draining."""
    state = _state(request)
    # Without the key (when keys are set) only whether and why: the model's path and build stay private.
    full = state.keys.allows(request.headers.get("authorization"))
    if state.phase != "ready" or state.service is None:
        raise state.not_ready(detail=full)
    if not full:
        return JSONResponse({"status": "ready"})
    body: dict[str, Any] = {"status": "ready", **state.service.backend.describe()}
    body["load_seconds"] = round(state.load_seconds, 3)
    body["warmup_seconds"] = round(state.warmup_seconds, 3)
    body["micro_batching"] = {
        "max_batch_size": state.settings.max_batch_size,
        "batch_wait_ms": state.settings.batch_wait_ms,
    }
    return JSONResponse(body)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    operation_id="Metrics",
    responses={200: {"content": {"text/plain": {}}}, 401: _error("Missing or wrong key (when keys are set).")},
)
async def prometheus(request: Request) -> Response:
    """Prometheus text format. Needs the key when SD_ENDPOINT_KEYS is set (it names the model and load)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    _state(request).keys.check(request.headers.get("authorization"))
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/swagger.json",
    summary="API description, as azmlinfsrv serves it",
    operation_id="GetSwaggerSpec",
    responses={200: {"content": {"application/json": {}}}, 404: _error("Unknown version.")},
)
async def swagger_json(
    request: Request,
    version: str = Query("2", description="2 (Swagger 2.0, the default), 3 (OpenAPI 3.0) or 3.1."),
) -> Response:
    doc = openapi.swagger(request.app, version)
    if doc is None:
        return JSONResponse(
            {
                "message": f"Swagger version [{version}] is not valid. Supported versions: "
                f"{list(openapi.SUPPORTED_VERSIONS)}"
            },
            404,
        )
    return JSONResponse(doc)


# ------------------------------------------------------------------------------------------------
# Scoring


@router.options("/score", include_in_schema=False)
async def score_options() -> Response:
    return Response(status_code=200)


@router.post(
    "/score",
    summary="Generate images (the Azure ML scoring contract)",
    operation_id="RunMLService",
    responses=SCORE_RESPONSES,
    openapi_extra=SCORE_OPENAPI_EXTRA,
)
async def score(request: Request) -> Response:
    state = _state(request)
    state.keys.check(request.headers.get("authorization"))
    check_content_type(request.headers.get("content-type"))
    body = await read_body(request, state.settings.max_body_bytes)
    result = await run_score(request, body)
    return JSONResponse(result.records, headers=result.headers)


async def run_score(request: Request, body: bytes | dict[str, Any]) -> ScoreResult:
    """Validate a contract body and run it through admission, the micro-batcher and the service.

    The one entry every generating route takes (/score, and /v1/images/* once translated to the contract),
    so that they share readiness, limits, batching, screening, timeouts and the request's log line.
    """
    state = _state(request)
    info = _log_info(request)
    service = state.require_ready()
    # Off the event loop: decoding a body's input images (image-to-image, inpainting) takes up to seconds.
    scoring = await asyncio.to_thread(service.parse, body)
    info["images"] = scoring.image_count
    info["steps"] = scoring.spec.steps
    info["size"] = f"{scoring.spec.width}x{scoring.spec.height}"
    if state.settings.log_prompts:
        info["prompts"] = [r.prompt[:_LOGGED_PROMPT_CHARS] for r in scoring.rows]
    token = service.new_cancel_token()
    admission, batcher = state.admission, state.batcher
    assert admission is not None and batcher is not None  # require_ready checked
    waited = await admission.acquire(token.deadline)
    held_from = time.monotonic()
    client = batcher.client()
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()  # the request id follows the work into the thread
    try:
        work = loop.run_in_executor(state.executor, ctx.run, _score_blocking, service, scoring, token, client)
    except RuntimeError:  # the executor was shut down: we are stopping
        client.close()
        admission.release()
        raise ServiceUnavailable("The server is shutting down.") from None
    # The slot is held until the thread is done, even when the response (408/499) goes out first.
    work.add_done_callback(functools.partial(_work_done, admission, held_from))
    try:
        result = await supervise(request, work, token, state.settings.request_timeout_ms)
    except EndpointError:
        info["steps_done"] = token.steps_done
        raise
    queue_s = waited + client.queue_s
    metrics.QUEUE_SECONDS.observe(queue_s)
    timings = {"queue": queue_s, **result.timings}
    info.update(
        images=result.images,
        steps=result.steps,
        blocked=result.blocked,
        batch_requests=client.batch_requests,
        batch_images=client.batch_images,
        timings_ms={k: round(v * 1000, 1) for k, v in timings.items()},
    )
    return result


def _score_blocking(
    service: GenerationService, scoring: ScoringRequest, token: CancelToken, client: BatchClient
) -> ScoreResult:
    with client:
        return service.score(scoring, token, client.generate)


def _work_done(admission: AdmissionControl, held_from: float, work: asyncio.Future[ScoreResult]) -> None:
    admission.release(time.monotonic() - held_from)
    if not work.cancelled():
        work.exception()  # mark it retrieved: a late error after a 408 is expected, not "never retrieved"


async def supervise(
    request: Request, work: asyncio.Future[ScoreResult], token: CancelToken, timeout_ms: int
) -> ScoreResult:
    """Wait for the work while watching the deadline and the client; both stop the generation."""
    try:
        while True:
            wait = DISCONNECT_POLL_S
            if token.deadline is not None:
                wait = max(0.0, min(wait, token.deadline - time.monotonic()))
            done, _ = await asyncio.wait({work}, timeout=wait)
            if done:
                try:
                    return work.result()
                except RequestTimeout:
                    raise _timed_out(token, timeout_ms) from None
            if token.deadline is not None and time.monotonic() >= token.deadline:
                # The worker sees the same deadline and stops at its next denoising step.
                raise _timed_out(token, timeout_ms)
            if await request.is_disconnected():
                token.cancel("client disconnected")
                raise GenerationCancelled("The client closed the connection; the generation was stopped.")
    except asyncio.CancelledError:
        token.cancel("server shutting down")
        raise


def _timed_out(token: CancelToken, timeout_ms: int) -> RequestTimeout:
    return RequestTimeout(
        f"The request did not finish within SD_ENDPOINT_REQUEST_TIMEOUT_MS ({timeout_ms} ms); its generation "
        f"was stopped after {token.steps_done} denoising steps."
    )


def check_content_type(value: str | None) -> None:
    """JSON, or no Content-Type at all (as score.py accepts: some clients send none)."""
    if value is None or not value.strip():
        return
    media_type = value.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json (got {media_type!r}).")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than ``limit`` bytes (413) whether or not Content-Length says so."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidRequest("Content-Length is not a number.") from None
        if size > limit:
            if size <= _DRAIN_LIMIT:
                await _drain(request.stream(), _DRAIN_LIMIT)
            raise PayloadTooLarge(f"Request body is {size} bytes; the limit is {limit} (SD_ENDPOINT_MAX_BODY_BYTES).")
    chunks: list[bytes] = []
    received = 0
    stream = request.stream()
    async for chunk in stream:
        received += len(chunk)
        if received > limit:
            await _drain(stream, _DRAIN_LIMIT - received)
            raise PayloadTooLarge(f"Request body is over {limit} bytes, the limit (SD_ENDPOINT_MAX_BODY_BYTES).")
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(stream: AsyncIterator[bytes], budget: int) -> None:
    try:
        async for chunk in stream:
            budget -= len(chunk)
            if budget < 0:
                return
    except Exception:  # the client went away, or the stream was already consumed: nothing to drain
        return
