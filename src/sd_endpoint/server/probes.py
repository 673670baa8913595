"""The routes that generate nothing: liveness (``GET /``), readiness (``GET /ready``), Prometheus metrics
(``GET /metrics``) and the API description as azmlinfsrv serves it (``GET /swagger.json``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from sd_endpoint import metrics
from sd_endpoint.server import openapi
from sd_endpoint.server.auth import require_key
from sd_endpoint.server.route_docs import RETRY_AFTER, error_response

if TYPE_CHECKING:
    from sd_endpoint.server.state import ServerState

router = APIRouter()


@router.get(
    "/",
    response_class=PlainTextResponse,
    summary="Liveness",
    operation_id="ServiceHealthCheck",
    responses={
        200: {"content": {"text/plain": {"example": "Healthy"}}},
        503: error_response("The model failed to load, or the generation worker stopped: restart."),
    },
)
async def liveness(request: Request) -> Response:
    """`Healthy` while the process can serve, including while the model loads."""
    state: ServerState = request.app.state.sd
    if not state.alive:  # the model failed to load, or the worker died: the platform should restart us
        raise state.not_ready(detail=state.keys.allows(request.headers.get("authorization")))
    return PlainTextResponse("Healthy")


@router.get(
    "/ready",
    summary="Readiness",
    operation_id="Readiness",
    responses={
        200: {"description": "Loaded and warmed up: what was loaded and why.", "content": {"application/json": {}}},
        503: error_response(
            "Loading, warming up, failed, shutting down, or the model's device failed its health check.",
            headers=RETRY_AFTER,
        ),
    },
)
async def readiness(request: Request) -> Response:
    """200 once the model is loaded and one warm-up generation has run; 503 before that and while draining."""
    state: ServerState = request.app.state.sd
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
    responses={200: {"content": {"text/plain": {}}}, 401: error_response("Missing or wrong key (when keys are set).")},
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
    responses={200: {"content": {"application/json": {}}}, 404: error_response("Unknown version.")},
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
