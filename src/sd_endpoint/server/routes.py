"""The routes. They only translate HTTP to the service and back; all model logic lives in the service."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.requests import ClientDisconnect

from sd_endpoint import metrics
from sd_endpoint.contract import ErrorBody, ImageRecord, ScoreRequest
from sd_endpoint.errors import (
    EndpointError,
    GenerationCancelled,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from sd_endpoint.jobs import CancelToken
from sd_endpoint.server import openapi
from sd_endpoint.server.admission import AdmissionControl
from sd_endpoint.server.auth import require_key
from sd_endpoint.server.microbatch import Job, MicroBatcher
from sd_endpoint.server.middleware import STATE_KEY
from sd_endpoint.service import ScoreResult, Scoring

if TYPE_CHECKING:
    from sd_endpoint.server.state import ServerState

router = APIRouter()

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
    responses={
        200: {"content": {"text/plain": {"example": "Healthy"}}},
        503: _error("The model failed to load, or the generation worker stopped: restart."),
    },
)
async def liveness(request: Request) -> Response:
    """`Healthy` while the process can serve, including while the model loads."""
    state = _state(request)
    if not state.alive:  # the model failed to load, or the worker died: the platform should restart us
        raise state.not_ready(detail=state.keys.allows(request.headers.get("authorization")))
    return PlainTextResponse("Healthy")


@router.get(
    "/ready",
    summary="Readiness",
    operation_id="Readiness",
    responses={
        200: {"description": "Loaded and warmed up: what was loaded and why.", "content": {"application/json": {}}},
        503: _error(
            "Loading, warming up, failed, shutting down, or the model's device failed its health check.",
            headers=_RETRY_AFTER,
        ),
    },
)
async def readiness(request: Request) -> Response:
    """200 once the model is loaded and one warm-up generation has run; 503 before that and while draining."""
    state = _state(request)
    # Without the key (when keys are set) only whether and why: the model's path and build stay private.
    full = state.keys.allows(request.headers.get("authorization"))
    if not await state.healthy() or state.service is None:
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
    dependencies=[Depends(require_key)],
)
async def prometheus(request: Request) -> Response:
    """Prometheus text format. Needs the key when SD_ENDPOINT_KEYS is set (it names the model and load)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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
    dependencies=[Depends(require_key)],
)
async def score(request: Request) -> Response:
    state = _state(request)
    check_content_type(request.headers.get("content-type"))
    started = time.perf_counter()
    body = await read_body(request, state.settings.max_body_bytes)
    result = await run_score(request, body, read_s=time.perf_counter() - started)
    return JSONResponse(result.records, headers=result.headers)


async def run_score(request: Request, body: bytes | dict[str, Any], *, read_s: float = 0.0) -> ScoreResult:
    """Validate a contract body and run it through admission, the micro-batcher and the service.

    The one entry every generating route takes (/score, and /v1/images/* once translated to the contract),
    so that they share readiness, limits, batching, screening, timeouts and the request's log line.
    This coroutine decides the request's fate: its answer, or the 408/499 when the deadline or the client's
    disconnect wins the race against the work.
    """
    state = _state(request)
    info = _log_info(request)
    service, admission, batcher = state.serving()
    timings = {"read": read_s} if read_s else {}
    started = time.perf_counter()
    # Off the event loop: decoding a body's input images (image-to-image, inpainting) takes up to seconds.
    scoring = service.begin(await asyncio.to_thread(service.parse, body))
    timings["parse"] = time.perf_counter() - started
    spec = scoring.spec
    info.update(images=scoring.request.image_count, steps=spec.steps, size=f"{spec.width}x{spec.height}")
    if state.settings.log_prompts:
        info["prompts"] = [r.prompt[:_LOGGED_PROMPT_CHARS] for r in scoring.request.rows]
    token = service.new_cancel_token()
    work = _Work(scoring, token, admission, batcher)
    try:
        await with_cancellation(request, work.run(), token, state.settings.request_timeout_ms)
    except EndpointError:
        info["steps_done"] = token.steps_done
        raise
    result = work.result
    assert result is not None  # run() returned
    metrics.QUEUE_SECONDS.observe(work.queue_s)
    timings.update(queue=work.queue_s, **scoring.timings)
    info.update(
        images=result.images,
        steps=result.steps,
        blocked=result.blocked,
        batch_requests=work.batch_requests,
        batch_images=work.batch_images,
        timings_ms={k: round(v * 1000, 1) for k, v in timings.items()},
    )
    return result


class _Work:
    """One request's stages on the event loop: a slot, then each stage in order (blocking ones in a
    short-lived thread, generation on the batcher's worker), holding the slot until the worker is done."""

    def __init__(
        self, scoring: Scoring, token: CancelToken, admission: AdmissionControl, batcher: MicroBatcher
    ) -> None:
        self.scoring = scoring
        self.token = token
        self.admission = admission
        self.batcher = batcher
        self.queue_s = 0.0  # admission wait + the wait for the worker
        self.batch_requests = 0
        self.batch_images = 0
        self.result: ScoreResult | None = None

    async def run(self) -> None:
        scoring, token = self.scoring, self.token
        slot = await self.admission.acquire(token.deadline)
        self.queue_s = slot.waited_s
        ticket = self.batcher.ticket()
        job: Job | None = None
        try:
            # 1. Screen the prompts (a network call, when screening is on).
            if scoring.screening:
                await asyncio.to_thread(scoring.screen_prompts)
            # 2. Generate, on the worker that owns the model.
            tasks = scoring.tasks()
            if tasks:
                submitted = time.perf_counter()
                job = self.batcher.submit(scoring.spec, tasks, token, ticket)
                try:
                    outcome = await job.result
                except asyncio.CancelledError:  # the deadline or the client won the race
                    self.batcher.withdraw(job, GenerationCancelled("The request is gone."))
                    raise
                waited = time.perf_counter() - submitted
                scoring.take(outcome.result, generate_s=outcome.generate_s)
                self.queue_s += max(0.0, waited - outcome.generate_s)
                self.batch_requests, self.batch_images = outcome.batch_requests, outcome.batch_images
            ticket.close()
            # 3. Encode, 4. screen the images, 5. the records.
            await asyncio.to_thread(scoring.encode)
            if scoring.screening:
                await asyncio.to_thread(scoring.screen_images)
            self.result = scoring.result()
        finally:
            ticket.close()
            # The slot is held until the worker is done with the job, even when a 408/499 went out first.
            if job is None:
                slot.release()
            else:
                job.when_finished(slot.release)


async def with_cancellation(
    request: Request, work: Coroutine[Any, Any, None], token: CancelToken, timeout_ms: int
) -> None:
    """Race ``work`` against the client's disconnect and the request deadline; the first to finish decides.

    The loser is cancelled (the work stops at its next await; the token stops the generation at its next
    denoising step). No polling: the listener waits on the ASGI receive channel, the deadline is a timeout.
    """
    handler = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_disconnected(request))
    timeout = None if token.deadline is None else max(0.0, token.deadline - time.monotonic())
    try:
        done, _ = await asyncio.wait({handler, listener}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # uvicorn gave up on us (shutdown grace passed)
        token.cancel("server shutting down")
        handler.cancel()
        listener.cancel()
        raise
    listener.cancel()
    if handler in done:
        try:
            handler.result()
        except RequestTimeout:
            raise _timed_out(token, timeout_ms) from None
        return
    handler.cancel()
    handler.add_done_callback(_retrieve)
    if listener in done:
        token.cancel("client disconnected")
        raise GenerationCancelled("The client closed the connection; the generation was stopped.")
    token.cancel("timeout")
    raise _timed_out(token, timeout_ms)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: nothing else can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # a late error after the 408/499 is expected, not "never retrieved"


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


async def read_body(request: Request, limit: int, chunk_timeout_s: float | None = None) -> bytes:
    """The raw body, refusing more than ``limit`` bytes (413) whether or not Content-Length says so, and
    (408) a client that lets ``chunk_timeout_s`` pass without sending the next chunk: a connection that
    declares a body and trickles it must not hold a socket open for ever. Default: the app's setting."""
    if chunk_timeout_s is None:
        chunk_timeout_s = _state(request).settings.body_read_timeout_s
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
    while True:
        try:
            async with asyncio.timeout(chunk_timeout_s):
                chunk = await anext(stream)
        except StopAsyncIteration:
            break
        except ClientDisconnect:  # gone mid-body (or its framing broke and the protocol answered 400 and closed)
            raise GenerationCancelled("The client closed the connection while sending the body.") from None
        except TimeoutError:
            raise RequestTimeout(
                f"The request body did not arrive: no data for {chunk_timeout_s:g} s after {received} bytes "
                "(SD_ENDPOINT_BODY_READ_TIMEOUT_S)."
            ) from None
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
