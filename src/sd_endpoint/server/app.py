"""The FastAPI application: factory, lifespan, error rendering, and the uvicorn runner.

Start-up never blocks the event loop: the lifespan starts loading the model (and one warm-up generation) in
a thread and returns at once, so ``GET /`` answers ``Healthy`` while ``GET /ready`` and ``POST /score``
answer 503 until the model is ready. If loading fails, the server exits (code 2 for a configuration or
model problem, 3 otherwise, like azmlinfsrv when ``init()`` fails), so that the platform restarts it and the
log says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from sd_endpoint.errors import EndpointError
from sd_endpoint.net import is_loopback
from sd_endpoint.server import openai_images, openapi, playground, probes
from sd_endpoint.server.middleware import STATE_KEY, RequestContextMiddleware
from sd_endpoint.server.protocol import JsonErrorsH11Protocol
from sd_endpoint.server.routes import router
from sd_endpoint.server.state import ServerState
from sd_endpoint.service import GenerationService
from sd_endpoint.settings import Settings

log = logging.getLogger("sd_endpoint.server")

# Every router the app serves (also what a 405 lists in Allow): the contract's routes, OpenAI's API, the page.
# The probes first, as azmlinfsrv lists them (the order of the OpenAPI document's paths).
_ROUTERS = (probes.router, router, openai_images.router, playground.router)

# azmlinfsrv's wording for the errors Flask raises by itself.
_HTTP_MESSAGES = {
    404: "The requested URL was not found on the server. If you entered the URL manually please check your "
    "spelling and try again.",
    405: "The method is not allowed for the requested URL.",
}


# ------------------------------------------------------------------------------------------------
# Factory


def create_app(
    settings: Settings,
    service: GenerationService | None = None,
    *,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the app. Without ``service`` the lifespan loads the model from ``settings`` in a thread.

    ``on_fatal`` is called when loading fails (default: SIGTERM to this process, so that it exits).
    """
    state = ServerState(settings, service, on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(state.start())
        try:
            yield
        finally:
            state.begin_drain()
            if not starting.done():
                starting.cancel()  # the load thread itself runs on as a daemon and is dropped at exit
            await state.stop()

    app = FastAPI(
        title="sd-endpoint",
        version=openapi.package_version(),
        description=openapi.DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        # No 307 from /score/ to a Location built from the client's Host header: /score/ is a plain 404.
        redirect_slashes=False,
    )
    app.state.sd = state
    for routes in _ROUTERS:
        app.include_router(routes)
    app.add_middleware(RequestContextMiddleware)
    app.add_exception_handler(EndpointError, _endpoint_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)

    def custom_openapi() -> dict[str, Any]:
        return openapi.openapi_31(app)

    app.openapi = custom_openapi  # type: ignore[method-assign]
    return app


async def _endpoint_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EndpointError)
    info = getattr(request.state, STATE_KEY, None)
    if isinstance(info, dict):
        info["error"] = exc.message
    return JSONResponse(exc.body(), exc.status_code, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = _HTTP_MESSAGES.get(exc.status_code) or str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return JSONResponse({"message": message}, exc.status_code, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method served at this path (Starlette's own Allow names only the first matching route's)."""
    methods: set[str] = set()
    for route in (route for routes in _ROUTERS for route in routes.routes):
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
    return JSONResponse({"message": "Invalid request: " + "; ".join(parts) + "."}, 400)


# ------------------------------------------------------------------------------------------------
# Running


def run_server(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code (0, or 2/3 when the model failed to load)."""
    if not settings.keys and not is_loopback(settings.host):
        log.warning(
            "Serving on %s with no key: anyone who can reach this address can generate images. Set "
            "SD_ENDPOINT_KEYS (primary,secondary), or rely on the platform in front (an Azure ML managed "
            "endpoint checks keys itself).",
            settings.host,
        )
    server: _DrainingServer | None = None

    def fatal() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=fatal)
    state: ServerState = app.state.sd
    server = _DrainingServer(uvicorn_config(app, settings), state)
    server.run()
    return state.exit_code


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """How uvicorn serves the app (also what the reliability tests run in a thread)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our handlers (setup_logging) format uvicorn's lines too
        access_log=False,  # the middleware writes one richer line per request
        lifespan="on",
        timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace_s)),
        server_header=False,
        # Past this many open connections: a JSON 503 with Retry-After, before the app runs.
        limit_concurrency=settings.max_connections,
        http=JsonErrorsH11Protocol,  # uvicorn's own 400/503 answers as {"message"} JSON
    )


class _DrainingServer(uvicorn.Server):  # type: ignore[misc]
    """uvicorn's server, with the app told to drain as soon as the signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._sd_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._sd_state.begin_drain()  # /ready answers 503 at once; uvicorn stops accepting, then waits
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                # uvicorn re-raises the signal once it has shut down, so the process would die "by SIGTERM";
                # a graceful stop on request is a clean exit (status 0) for the platform and for make.
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured.clear()
