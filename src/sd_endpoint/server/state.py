"""The server's state and lifecycle, on ``app.state.sd``: one ``Phase``, changed under a lock.

    LOADING -> WARMING_UP -> READY -> SHUTTING_DOWN
       \\____________\\_______\\-> FAILED (the model did not load: the process exits)
                              \\-> BROKEN (the generation worker died: liveness fails, the platform restarts us)

The model loads in a daemon thread (a SIGTERM during a long load must not wait for it); the phase is
written from that thread, the event loop and signal handlers, so every change is one atomic step.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from sd_endpoint import metrics
from sd_endpoint.errors import ConfigError, ModelLoadError, ServiceUnavailable
from sd_endpoint.server.admission import AdmissionControl
from sd_endpoint.server.auth import KeyCheck
from sd_endpoint.server.microbatch import MicroBatcher
from sd_endpoint.service import GenerationService
from sd_endpoint.settings import Settings

log = logging.getLogger("sd_endpoint.server")

# Retry-After on 503 while the model loads.
LOADING_RETRY_S = 10
# A readiness probe re-checks the device at most this often, and gives the check this long.
_HEALTH_EVERY_S = 5.0
_HEALTH_TIMEOUT_S = 10.0


class Phase(enum.Enum):
    LOADING = "loading"
    WARMING_UP = "warming up"
    READY = "ready"
    SHUTTING_DOWN = "shutting down"
    FAILED = "failed"
    BROKEN = "broken"


_FINAL = frozenset({Phase.FAILED, Phase.BROKEN, Phase.SHUTTING_DOWN})


class ServerState:
    """Everything the routes need: settings, keys, the service, admission and the batcher."""

    def __init__(
        self, settings: Settings, service: GenerationService | None, on_fatal: Callable[[], None] | None
    ) -> None:
        self.settings = settings
        self.service = service
        self.owns_service = service is None
        self._lock = threading.Lock()
        self._phase = Phase.LOADING
        self.error = ""
        self.exit_code = 0
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0
        self.keys = KeyCheck(settings.keys)
        self.admission: AdmissionControl | None = None
        self.batcher: MicroBatcher | None = None
        self._on_fatal = on_fatal or _terminate_self
        self._loop: asyncio.AbstractEventLoop | None = None
        self._health_at = 0.0
        self._health_error = ""

    @property
    def phase(self) -> Phase:
        return self._phase

    def _move(self, to: Phase, *, unless: frozenset[Phase] = _FINAL) -> bool:
        """Change phase unless the current one is in ``unless``; returns whether it changed."""
        with self._lock:
            if self._phase in unless:
                return False
            self._phase = to
        metrics.READY.set(1 if to is Phase.READY else 0)
        return True

    # -- what the routes ask -------------------------------------------------------------------
    def serving(self) -> tuple[GenerationService, AdmissionControl, MicroBatcher]:
        """The parts a generating request needs, or the 503 that says why not."""
        service, admission, batcher = self.service, self.admission, self.batcher
        if self._phase is not Phase.READY or service is None or admission is None or batcher is None:
            raise self.not_ready()
        if not batcher.alive:  # never waits for a deadline behind a worker that is gone
            self._worker_died(batcher.death or "the worker thread is not running")
            raise self.not_ready()
        return service, admission, batcher

    @property
    def alive(self) -> bool:
        """Liveness: false once the model failed to load or the worker died (the platform restarts us)."""
        if self.batcher is not None and self.batcher.death is not None:
            self._worker_died(self.batcher.death)
        return self._phase not in (Phase.FAILED, Phase.BROKEN)

    def not_ready(self, *, detail: bool = True) -> ServiceUnavailable:
        """Why requests are refused now; ``detail`` False leaves out the load error (it may name paths)."""
        phase = self._phase
        if phase is Phase.FAILED:
            message = f"The model failed to load: {self.error}" if detail else "The model failed to load (see the log)."
        elif phase is Phase.BROKEN:
            message = f"The generation worker stopped ({self.error}); the instance must be restarted."
        elif phase is Phase.READY and self._health_error:
            message = f"The model's device did not answer a health check: {self._health_error}"
        else:
            message = {
                Phase.LOADING: "The model is loading; retry when GET /ready answers 200.",
                Phase.WARMING_UP: "The model is warming up; retry when GET /ready answers 200.",
                Phase.SHUTTING_DOWN: "The server is shutting down.",
            }.get(phase, "Not ready.")
        retry = LOADING_RETRY_S if phase in (Phase.LOADING, Phase.WARMING_UP) else 5
        return ServiceUnavailable(message, retry_after_s=retry)

    async def healthy(self) -> bool:
        """READY and the model's device answers one tiny op (at most every few seconds), as TGI checks."""
        if self._phase is not Phase.READY or self.service is None:
            return False
        if self.batcher is None:
            return False
        if not self.batcher.alive:
            self._worker_died(self.batcher.death or "the worker thread is not running")
            return False
        now = time.monotonic()
        if now - self._health_at >= _HEALTH_EVERY_S:
            self._health_at = now
            try:
                await asyncio.wait_for(asyncio.to_thread(self.service.health_check), _HEALTH_TIMEOUT_S)
                self._health_error = ""
            except Exception as exc:  # any failure of the device is the answer
                self._health_error = f"{type(exc).__name__}: {exc}"[:300] or "no answer"
                log.error("Health check failed: %s", self._health_error)
        return not self._health_error

    def begin_drain(self) -> None:
        """SIGTERM: report not-ready at once, so that load balancers stop sending work while we finish."""
        self._move(Phase.SHUTTING_DOWN, unless=frozenset({Phase.FAILED, Phase.BROKEN}))

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.admission = AdmissionControl(
            self.settings.max_concurrent_requests,
            self.settings.max_concurrent_requests
            if self.settings.max_queued_requests is None
            else self.settings.max_queued_requests,
            self.settings.max_queue_wait_ms / 1000.0,
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
        service = self.service
        batcher = MicroBatcher(
            service.backend.generate,
            max_batch_size=self.settings.max_batch_size,
            batch_wait_s=self.settings.batch_wait_ms / 1000.0,
            on_death=self._worker_died,
        )
        self.batcher = batcher
        if service.ready:
            batcher.start()
        else:
            if not self._move(Phase.WARMING_UP):
                return
            log.info("Warming up (one small generation) ...")
            # On the worker thread, like every later call into the model (thread-local torch/CUDA state).
            self.warmup_seconds = batcher.start(first=service.warmup).started.result() or 0.0
        if not self._move(Phase.READY):
            return
        log.info(
            "Ready: POST /score, liveness GET /, readiness GET /ready, metrics GET /metrics, API GET /swagger.json",
            extra={"auth": "key" if self.keys.enabled else "none"},
        )

    def _worker_died(self, reason: str) -> None:
        """From the dying worker thread: liveness fails from now on (the batcher already failed its jobs)."""
        with self._lock:
            self.error = reason
        self._move(Phase.BROKEN, unless=frozenset({Phase.FAILED, Phase.SHUTTING_DOWN}))

    def _fail(self, exc: BaseException) -> None:
        self.error = str(exc)
        self._move(Phase.FAILED, unless=frozenset())
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
