"""The contract's route ``POST /score``, and ``run_score``: the one entry of every generating route, which
decides each request's fate. They only translate HTTP to the service and back; all model logic lives in the
service. (The probes and documents are ``probes.py``.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from sd_endpoint import metrics
from sd_endpoint.errors import EndpointError, GenerationCancelled, RequestTimeout
from sd_endpoint.jobs import CancelToken
from sd_endpoint.server.admission import AdmissionControl
from sd_endpoint.server.auth import require_key
from sd_endpoint.server.body import check_content_type, read_body
from sd_endpoint.server.microbatch import Job, MicroBatcher
from sd_endpoint.server.middleware import STATE_KEY
from sd_endpoint.server.route_docs import SCORE_OPENAPI_EXTRA, SCORE_RESPONSES
from sd_endpoint.service import ScoreResult, Scoring

if TYPE_CHECKING:
    from sd_endpoint.server.state import ServerState

router = APIRouter()

# Log at most this many characters of each prompt (SD_ENDPOINT_LOG_PROMPTS).
_LOGGED_PROMPT_CHARS = 500


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.sd
    return state


def _log_info(request: Request) -> dict[str, Any]:
    info = getattr(request.state, STATE_KEY, None)
    return info if isinstance(info, dict) else {}


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
                await self._off_loop(scoring.screen_prompts)
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
            await self._off_loop(scoring.encode)
            if scoring.screening:
                await self._off_loop(scoring.screen_images)
            self.result = scoring.result()
        finally:
            ticket.close()
            # The slot is held until the worker is done with the job, even when a 408/499 went out first.
            if job is None:
                slot.release()
            else:
                job.when_finished(slot.release)

    async def _off_loop(self, stage: Callable[[], None]) -> None:
        """A blocking stage in a short-lived thread. Its timing is what the request waited for it, the thread
        hops included, so that the stages still add up to the request's duration on a busy machine."""
        timings = self.scoring.timings
        before = set(timings)
        started = time.perf_counter()
        await asyncio.to_thread(stage)
        waited = time.perf_counter() - started
        added = [k for k in timings if k not in before]
        if added:
            timings[added[-1]] += max(0.0, waited - sum(timings[k] for k in added))


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
