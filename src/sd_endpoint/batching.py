"""Load control for the HTTP server: admission (how many requests) and micro-batching (how they run).

Two stages sit between a validated request and the backend:

``AdmissionControl`` (event loop side)
    At most ``max_in_flight`` requests are served at once (SD_ENDPOINT_MAX_CONCURRENT_REQUESTS), at most
    ``max_queued`` wait for a slot, and none waits longer than ``max_wait_s`` (SD_ENDPOINT_MAX_QUEUE_WAIT_MS).
    Anything past that is refused at once with ``Overloaded`` (429 + Retry-After), so memory stays bounded
    whatever the offered load. A slot is held until the request's worker thread has finished, not merely
    until its response was sent, so a timed-out request cannot let a new one pile work on top of it.

``MicroBatcher`` (one worker thread)
    The only caller of ``backend.generate``: GPU work is serialized and the batcher is the parallelism.
    Jobs whose ``GenerationSpec`` is equal are merged into one pipeline call of at most ``max_batch_size``
    images. A request's own images are never split across calls (a request larger than ``max_batch_size``
    runs alone), so the images per call are bounded by max(max_batch_size, SD_ENDPOINT_MAX_IMAGES_PER_REQUEST).
    The worker waits up to ``batch_wait_s`` for more jobs, and only while an admitted request has yet to
    submit its images, so a lone request never pays the wait. Merging does not change any image: the
    backend seeds one generator per image.

Failure and cancellation inside a merged call:

* If the call raises, each member request is run again alone, so only the request at fault gets the error.
* A member that is cancelled (client gone) or passes its deadline gets its own error at once, while the
  call goes on for its batch-mates; the call itself stops at the next denoising step only when every
  member has stopped (``_SharedToken``). A member that stops while still queued is dropped from the queue.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from types import TracebackType

from sd_endpoint import metrics
from sd_endpoint.errors import (
    EndpointError,
    GenerationCancelled,
    GenerationFailed,
    Overloaded,
    RequestTimeout,
    ServiceUnavailable,
)
from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask
from sd_endpoint.logs import request_id

log = logging.getLogger(__name__)

BackendGenerate = Callable[[GenerationSpec, Sequence[ImageTask], "CancelToken | None"], BatchResult]

# How often a thread waiting on a job looks at its cancel token (client gone); deadlines are waited for exactly.
_POLL_S = 0.1


def stopped(token: CancelToken) -> bool:
    """Whether ``token.check()`` would raise now, without raising."""
    return token.cancelled or (token.deadline is not None and time.monotonic() >= token.deadline)


# ------------------------------------------------------------------------------------------------
# Admission


class AdmissionControl:
    """A bounded number of requests in flight, with a bounded queue in front of them.

    Runs on the event loop only (no locks); ``release`` must be called from the loop too.
    """

    def __init__(self, max_in_flight: int, max_queued: int, max_wait_s: float) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self.max_queued = max(0, max_queued)
        self.max_wait_s = max(0.0, max_wait_s)
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._service_s = 1.0  # moving average of how long a request holds its slot, for Retry-After
        self._publish()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self, deadline: float | None = None) -> float:
        """Take a slot, waiting in the queue if allowed; returns the seconds waited.

        Raises ``Overloaded`` when the queue is full or the wait would pass ``max_wait_s``. A request
        deadline earlier than that bounds the wait too (the caller then answers 408, not 429).
        """
        if self._in_flight < self.max_in_flight and not self.queued:
            self._in_flight += 1
            self._publish()
            return 0.0
        if self.queued >= self.max_queued or self.max_wait_s <= 0:
            raise self._overloaded()
        wait = self.max_wait_s
        by_deadline = deadline is not None and deadline - time.monotonic() < wait
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - time.monotonic()))
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._publish()
        started = time.monotonic()
        try:
            await asyncio.wait_for(waiter, wait)
        except asyncio.TimeoutError:
            if not (waiter.done() and not waiter.cancelled()):
                if by_deadline:
                    raise RequestTimeout(
                        "The request timed out waiting for a free slot (SD_ENDPOINT_REQUEST_TIMEOUT_MS); "
                        "no generation was started."
                    ) from None
                raise self._overloaded() from None
            # The slot was handed over just as the wait ran out: keep it.
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, but the request is gone
            raise
        finally:
            if waiter in self._waiters and not waiter.done():
                waiter.cancel()
            self._publish()
        return time.monotonic() - started

    def release(self, held_s: float | None = None) -> None:
        """Give a slot back: to the longest-waiting request, or to the pool."""
        if held_s is not None:
            self._service_s = 0.8 * self._service_s + 0.2 * held_s
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; in-flight count unchanged
                self._publish()
                return
        self._in_flight = max(0, self._in_flight - 1)
        self._publish()

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, drained at the observed service rate."""
        ahead = self.queued + 1
        return max(1, min(60, math.ceil(self._service_s * ahead / self.max_in_flight)))

    def _overloaded(self) -> Overloaded:
        return Overloaded(
            f"Too many requests: {self._in_flight} in flight (SD_ENDPOINT_MAX_CONCURRENT_REQUESTS="
            f"{self.max_in_flight}) and {self.queued} queued (at most {self.max_queued}, each for at most "
            f"{self.max_wait_s * 1000:.0f} ms, SD_ENDPOINT_MAX_QUEUE_WAIT_MS). Retry later.",
            retry_after_s=self.retry_after_s(),
        )

    def _publish(self) -> None:
        self._waiters = deque(w for w in self._waiters if not w.done())
        metrics.IN_FLIGHT.set(self._in_flight)
        metrics.QUEUED.set(len(self._waiters))


# ------------------------------------------------------------------------------------------------
# Micro-batching


@dataclass(eq=False)
class _Job:
    spec: GenerationSpec
    tasks: tuple[ImageTask, ...]
    cancel: CancelToken
    request_id: str
    future: Future[BatchResult] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    batch_requests: int = 0
    batch_images: int = 0

    def fail_stopped(self) -> None:
        """Resolve with the token's own error (GenerationCancelled or RequestTimeout)."""
        try:
            self.cancel.check()
        except EndpointError as exc:
            self.set_exception(exc)
        else:  # not actually stopped: a caller bug, but never leave a future unresolved
            self.set_exception(GenerationCancelled("Generation stopped."))

    def set_exception(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    def set_result(self, result: BatchResult) -> None:
        if not self.future.done():
            self.future.set_result(result)


class _SharedToken(CancelToken):
    """The token of a merged call: it fires only once every member request has stopped."""

    def __init__(self, members: Sequence[CancelToken]) -> None:
        super().__init__(None)
        self._members = list(members)

    def check(self) -> None:
        for member in self._members:
            member.steps_done = self.steps_done
        if self._members and all(stopped(m) for m in self._members):
            first = self._members[0]
            try:
                first.check()
            finally:
                self.reason = first.reason or "cancelled"
                self.cancel(self.reason)


class MicroBatcher:
    """Merges concurrent jobs with equal specs into one backend call, on one worker thread."""

    def __init__(
        self,
        generate: BackendGenerate,
        *,
        max_batch_size: int = 4,
        batch_wait_s: float = 0.01,
        name: str = "generate",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._generate = generate
        self.max_batch_size = max_batch_size
        self.batch_wait_s = max(0.0, batch_wait_s)
        self._cond = threading.Condition()
        self._pending: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._expected = 0  # admitted requests that have not submitted their images yet
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> MicroBatcher:
        self._thread.start()
        return self

    def close(self, timeout: float | None = 5.0) -> None:
        """Refuse new jobs, fail queued ones, stop the running call at its next step, join the worker."""
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            running = list(self._running)
            self._cond.notify_all()
        for job in pending:
            job.set_exception(ServiceUnavailable("The server is shutting down."))
        for job in running:
            job.cancel.cancel("server shutting down")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    # -- submitting ----------------------------------------------------------------------------
    def client(self) -> BatchClient:
        """One request's handle. While it is open and unused, the worker may wait for its images."""
        return BatchClient(self)

    def generate(
        self, spec: GenerationSpec, tasks: Sequence[ImageTask], cancel: CancelToken | None = None
    ) -> BatchResult:
        """Blocking: run ``tasks`` (possibly merged with other jobs) and return their images in order."""
        return self._wait(self._submit(spec, tasks, cancel, expected=False))

    def _submit(
        self, spec: GenerationSpec, tasks: Sequence[ImageTask], cancel: CancelToken | None, *, expected: bool
    ) -> _Job:
        job = _Job(spec, tuple(tasks), cancel or CancelToken(), request_id.get())
        with self._cond:
            if expected:
                self._expected -= 1
            if self._closed:
                raise ServiceUnavailable("The server is shutting down.")
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def _expect(self, delta: int) -> None:
        with self._cond:
            self._expected += delta
            self._cond.notify_all()

    def _wait(self, job: _Job) -> BatchResult:
        while True:
            timeout = _POLL_S
            if job.cancel.deadline is not None:
                timeout = min(timeout, max(0.0, job.cancel.deadline - time.monotonic()) + 0.001)
            try:
                return job.future.result(timeout)
            except FutureTimeout:
                if stopped(job.cancel):
                    self._withdraw(job)
                    job.fail_stopped()
                    return job.future.result()  # raises the token's error

    def _withdraw(self, job: _Job) -> None:
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                pass  # already running (its batch-mates still want the call) or done

    # -- the worker ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._run(batch)
            with self._cond:
                self._running = []

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while True:
                self._drop_stopped()
                if self._pending:
                    break
                if self._closed:
                    return None
                self._cond.wait()
            head = self._pending.popleft()
            batch, images = [head], len(head.tasks)
            wait_until = head.enqueued + self.batch_wait_s
            while images < self.max_batch_size:
                for job in list(self._pending):
                    if (
                        job.spec == head.spec
                        and images + len(job.tasks) <= self.max_batch_size
                        and not stopped(job.cancel)
                    ):
                        self._pending.remove(job)
                        batch.append(job)
                        images += len(job.tasks)
                # Wait only for requests that were admitted but have not submitted yet.
                remaining = wait_until - time.monotonic()
                if images >= self.max_batch_size or self._expected <= 0 or self._closed or remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._running = batch
            return batch

    def _drop_stopped(self) -> None:
        for job in [j for j in self._pending if stopped(j.cancel)]:
            self._pending.remove(job)
            job.fail_stopped()

    def _run(self, batch: list[_Job]) -> None:
        spec = batch[0].spec
        tasks = [task for job in batch for task in job.tasks]
        token = _SharedToken([job.cancel for job in batch])
        started = time.monotonic()
        for job in batch:
            job.started = started
            job.batch_requests = len(batch)
            job.batch_images = len(tasks)
        # Log lines from inside the backend carry the request id (of the first request when merged).
        ctx_token = request_id.set(",".join(job.request_id for job in batch))
        try:
            try:
                result = self._generate(spec, tasks, token)
                if len(result.images) != len(tasks):
                    raise GenerationFailed(f"The backend returned {len(result.images)} images for {len(tasks)} tasks.")
            except EndpointError as exc:
                metrics.STEPS.inc(token.steps_done)
                if token.cancelled and all(stopped(job.cancel) for job in batch):
                    self._stopped_early(batch, token, spec)
                    return
                self._failed(batch, exc)
                return
            except Exception as exc:
                metrics.STEPS.inc(token.steps_done)
                self._failed(batch, exc)
                return
        finally:
            request_id.reset(ctx_token)
        elapsed = time.monotonic() - started
        metrics.BATCH_SIZE.observe(len(tasks))
        metrics.BATCH_REQUESTS.observe(len(batch))
        metrics.GENERATION_SECONDS.observe(elapsed)
        metrics.IMAGES.inc(len(tasks))
        metrics.STEPS.inc(result.steps_done)
        if elapsed > 0:
            metrics.STEPS_PER_SECOND.set(result.steps_done / elapsed)
        offset = 0
        for job in batch:
            n = len(job.tasks)
            notes = result.notes[offset : offset + n] if result.notes else [[] for _ in range(n)]
            job.set_result(BatchResult(result.images[offset : offset + n], result.steps_done, result.seconds, notes))
            offset += n

    def _stopped_early(self, batch: list[_Job], token: _SharedToken, spec: GenerationSpec) -> None:
        metrics.CANCELLED.labels(token.reason or "cancelled").inc()
        log.info(
            "Generation stopped after %d of %d denoising steps: %s",
            token.steps_done,
            spec.steps,
            token.reason or "cancelled",
            extra={"requests": len(batch)},
        )
        for job in batch:
            job.fail_stopped()

    def _failed(self, batch: list[_Job], exc: BaseException) -> None:
        if len(batch) > 1:
            # One bad request must not fail its batch-mates: run each alone, so only its own call fails.
            log.warning(
                "A merged call of %d requests failed (%s: %s); running each request alone",
                len(batch),
                type(exc).__name__,
                exc,
            )
            for job in batch:
                if stopped(job.cancel):
                    job.fail_stopped()
                else:
                    self._run([job])
            return
        job = batch[0]
        if isinstance(exc, EndpointError):
            log.warning("Generation failed: %s", exc.message)
            job.set_exception(exc)
        else:
            log.error("Generation failed", exc_info=exc)
            job.set_exception(
                GenerationFailed(
                    f"Generation failed ({type(exc).__name__}); see the server log for request id {job.request_id}."
                )
            )


class BatchClient:
    """A request's handle on the batcher; ``generate`` matches ``GenerationService.score``'s seam."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher = batcher
        self._expected = True
        self.queue_s = 0.0  # from submission to the start of its pipeline call
        self.batch_requests = 0
        self.batch_images = 0
        batcher._expect(1)

    def generate(
        self, spec: GenerationSpec, tasks: Sequence[ImageTask], cancel: CancelToken | None = None
    ) -> BatchResult:
        expected, self._expected = self._expected, False
        job = self._batcher._submit(spec, tasks, cancel, expected=expected)
        try:
            return self._batcher._wait(job)
        finally:
            if job.started is not None:
                self.queue_s = job.started - job.enqueued
                self.batch_requests = job.batch_requests
                self.batch_images = job.batch_images

    def close(self) -> None:
        if self._expected:
            self._expected = False
            self._batcher._expect(-1)

    def __enter__(self) -> BatchClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
