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
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from sd_endpoint import metrics
from sd_endpoint.batching import AdmissionControl, MicroBatcher
from sd_endpoint.errors import ConfigError, EndpointError, ModelLoadError, ServiceUnavailable
from sd_endpoint.net import is_loopback
from sd_endpoint.server import openai_images, openapi, playground
from sd_endpoint.server.auth import KeyCheck
from sd_endpoint.server.middleware import STATE_KEY, RequestContextMiddleware
from sd_endpoint.server.routes import router
from sd_endpoint.service import GenerationService
from sd_endpoint.settings import Settings

log = logging.getLogger("sd_endpoint.server")

# Every router the app serves (also what a 405 lists in Allow): the contract's routes, OpenAI's API, the page.
_ROUTERS = (router, openai_images.router, playground.router)

# azmlinfsrv's wording for the errors Flask raises by itself.
_HTTP_MESSAGES = {
    404: "The requested URL was not found on the server. If you entered the URL manually please check your "
    "spelling and try again.",
    405: "The method is not allowed for the requested URL.",
}
# Retry-After on 503 while the model loads.
_LOADING_RETRY_S = 10


class ServerState:
    """Everything the routes need, on ``app.state.sd``."""

    def __init__(
        self, settings: Settings, service: GenerationService | None, on_fatal: Callable[[], None] | None
    ) -> None:
        self.settings = settings
        self.service = service
        self.owns_service = service is None
        self.phase = "loading"  # loading -> warming up -> ready -> shutting down; or failed
        self.error = ""
        self.exit_code = 0
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0
        self.keys = KeyCheck(settings.keys)
        self.admission: AdmissionControl | None = None
        self.batcher: MicroBatcher | None = None
        self.executor: ThreadPoolExecutor | None = None
        self._on_fatal = on_fatal or _terminate_self

    # -- what the routes ask -------------------------------------------------------------------
    def require_ready(self) -> GenerationService:
        if self.phase != "ready" or self.service is None or self.batcher is None or self.admission is None:
            raise self.not_ready()
        return self.service

    def not_ready(self, *, detail: bool = True) -> ServiceUnavailable:
        """Why requests are refused now; ``detail`` False leaves out the load error (it may name paths)."""
        failed = f"The model failed to load: {self.error}" if detail else "The model failed to load (see the log)."
        messages = {
            "loading": "The model is loading; retry when GET /ready answers 200.",
            "warming up": "The model is warming up; retry when GET /ready answers 200.",
            "shutting down": "The server is shutting down.",
            "failed": failed,
        }
        retry = _LOADING_RETRY_S if self.phase in ("loading", "warming up") else 5
        return ServiceUnavailable(messages.get(self.phase, "Not ready."), retry_after_s=retry)

    def begin_drain(self) -> None:
        """SIGTERM: report not-ready at once, so that load balancers stop sending work while we finish."""
        if self.phase != "failed":
            self.phase = "shutting down"
        metrics.READY.set(0)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self.admission = AdmissionControl(
            self.settings.max_concurrent_requests,
            self.settings.max_concurrent_requests
            if self.settings.max_queued_requests is None
            else self.settings.max_queued_requests,
            self.settings.max_queue_wait_ms / 1000.0,
        )
        self.executor = ThreadPoolExecutor(
            max_workers=self.settings.max_concurrent_requests + 1, thread_name_prefix="score"
        )
        try:
            await _in_daemon_thread(self._load_and_warm_up)
        except Exception as exc:
            self._fail(exc)

    def _load_and_warm_up(self) -> None:
        if self.service is None:
            log.info("Loading the model ...")
            started = time.perf_counter()
            self.service = GenerationService.from_settings(self.settings)
            self.load_seconds = time.perf_counter() - started
            log.info("Model loaded in %.1f s", self.load_seconds, extra={"backend": self.service.backend.describe()})
        if self.phase == "shutting down":
            return
        if not self.service.ready:
            self.phase = "warming up"
            log.info("Warming up (one small generation) ...")
            self.warmup_seconds = self.service.warmup()
        if self.phase == "shutting down":
            return
        self.batcher = MicroBatcher(
            self.service.backend.generate,
            max_batch_size=self.settings.max_batch_size,
            batch_wait_s=self.settings.batch_wait_ms / 1000.0,
        ).start()
        self.phase = "ready"
        metrics.READY.set(1)
        log.info(
            "Ready: POST /score, liveness GET /, readiness GET /ready, metrics GET /metrics, API GET /swagger.json",
            extra={"auth": "key" if self.keys.enabled else "none"},
        )

    def _fail(self, exc: BaseException) -> None:
        self.phase = "failed"
        self.error = str(exc)
        metrics.READY.set(0)
        if isinstance(exc, (ConfigError, ModelLoadError)):
            self.exit_code = 2
            log.error("Could not start: %s", exc)
        else:
            self.exit_code = 3
            log.error("Could not start: the model failed to load", exc_info=exc)
        self._on_fatal()

    async def stop(self) -> None:
        self.begin_drain()
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.close, 10.0)
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        if self.service is not None and self.owns_service:
            self.service.close()
        log.info("Stopped")


async def _in_daemon_thread(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a daemon thread: a SIGTERM during a long model load must not wait for the load."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def target() -> None:
        outcome: BaseException | None = None
        try:
            fn()
        except BaseException as exc:
            outcome = exc
        try:
            loop.call_soon_threadsafe(_settle, done, outcome)
        except RuntimeError:
            pass  # the loop is closed: the server stopped while this was still loading

    threading.Thread(target=target, name="load-model", daemon=True).start()
    await done


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


def _terminate_self() -> None:
    """Default reaction to a failed start when not run by ``run_server``: stop the process."""
    os.kill(os.getpid(), signal.SIGTERM)


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
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our handlers (setup_logging) format uvicorn's lines too
        access_log=False,  # the middleware writes one richer line per request
        lifespan="on",
        timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace_s)),
        server_header=False,
    )
    server = _DrainingServer(config, state)
    server.run()
    return state.exit_code


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
