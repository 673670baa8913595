"""Micro-batching: one worker thread owns the model and runs every pipeline call; the event loop waits.

Requests (on the event loop) ``submit`` jobs and await their ``Job.result`` future. The worker thread is the
only caller of ``backend.generate``, the start-up warm-up included (``start(first=...)``): jobs whose
``GenerationSpec`` is equal are merged into one call of at most ``max_batch_size`` images. A request's own
images are never split across calls (a request larger than ``max_batch_size`` runs alone). The worker waits up
to ``batch_wait_s`` for more jobs, and only while an admitted request has yet to submit (``Ticket``), so a
lone request never pays the wait. Merging changes no image: the backend seeds one generator per image.

Results cross in one direction: the worker hands each outcome to the loop with ``call_soon_threadsafe``,
and only the loop resolves a job's future (and only once), so no future is ever set from two threads.

Failure and cancellation:

* A job whose prompts the model cannot encode is refused at ``submit`` (400); it never joins a merge.
* If a merged call raises, each member runs again alone, so only the request at fault gets the error.
* A member that stops (client gone, deadline) is answered by the loop at once; the call goes on for its
  batch-mates and stops at the next denoising step only when every member has stopped (``_SharedToken``).
* Every worker iteration is wrapped: a failure in our own bookkeeping fails that call's requests and the
  worker goes on. Should the thread still end, ``on_death`` is told, queued jobs get a 503 at once and new
  ones are refused.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sd_endpoint import metrics
from sd_endpoint.errors import EndpointError, GenerationCancelled, GenerationFailed, InvalidRequest, ServiceUnavailable
from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask
from sd_endpoint.logs import request_id

log = logging.getLogger(__name__)

BackendGenerate = Callable[[GenerationSpec, Sequence[ImageTask], "CancelToken | None"], BatchResult]


@dataclass(frozen=True)
class Outcome:
    """What a request gets back from the worker."""

    result: BatchResult
    queue_s: float  # from submit to the start of its pipeline call
    generate_s: float  # the pipeline call itself
    batch_requests: int
    batch_images: int


@dataclass(eq=False)
class Job:
    """One request's images. ``result`` lives on ``loop`` and is resolved there only, once."""

    spec: GenerationSpec
    tasks: tuple[ImageTask, ...]
    cancel: CancelToken
    request_id: str
    loop: asyncio.AbstractEventLoop
    result: asyncio.Future[Outcome]
    enqueued: float = field(default_factory=time.monotonic)
    finished: bool = False  # the worker is done with it (or it never reached the worker); loop side
    _on_finished: list[Callable[[], None]] = field(default_factory=list)

    def when_finished(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop once the worker no longer works for this job (now, if it is done)."""
        if self.finished:
            callback()
        else:
            self._on_finished.append(callback)

    def settle(self, outcome: Outcome | BaseException) -> None:
        """Loop side: the first outcome answers the request; the job is finished either way."""
        if not self.result.done():
            if isinstance(outcome, BaseException):
                self.result.set_exception(outcome)
            else:
                self.result.set_result(outcome)
        if not self.finished:
            self.finished = True
            callbacks, self._on_finished = self._on_finished, []
            for callback in callbacks:
                callback()


def _retrieve(future: asyncio.Future[Outcome]) -> None:
    if not future.cancelled():
        future.exception()  # a late error nobody awaits (the request already answered) is expected


class Ticket:
    """An admitted request that has not submitted yet: while any is open the worker may wait for it."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher = batcher
        self.open = True
        batcher._expect(1)

    def close(self) -> None:
        if self.open:
            self.open = False
            self._batcher._expect(-1)


class _SharedToken(CancelToken):
    """The token of a merged call: it fires only once every member request has stopped."""

    def __init__(self, members: Sequence[CancelToken]) -> None:
        super().__init__(None)
        self._members = list(members)

    def check(self) -> None:
        for member in self._members:
            member.steps_done = self.steps_done
        if self._members and all(m.stopped for m in self._members):
            first = self._members[0]
            try:
                first.check()
            finally:
                self.reason = first.reason or "cancelled"
                self.cancel(self.reason)


def check_member(tasks: Sequence[ImageTask]) -> None:
    """Refuse, before it can share a call, a job the model would fail on (validated once more here because
    one bad member would otherwise fail the whole merged call and make its batch-mates run twice)."""
    if not tasks:
        raise InvalidRequest("A generation needs at least one image.")
    for task in tasks:
        for name, text in (("prompt", task.prompt), ("negative_prompt", task.negative_prompt or "")):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(f"{name}: holds a lone UTF-16 surrogate, which is not text.") from None


class MicroBatcher:
    """Merges concurrent jobs with equal specs into one backend call, on one worker thread."""

    def __init__(
        self,
        generate: BackendGenerate,
        *,
        max_batch_size: int = 4,
        batch_wait_s: float = 0.01,
        name: str = "generate",
        on_death: Callable[[str], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._generate = generate
        self.max_batch_size = max_batch_size
        self.batch_wait_s = max(0.0, batch_wait_s)
        self._on_death = on_death
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._expected = 0  # admitted requests that have not submitted their images yet
        self._closed = False
        self.death: str | None = None  # why the worker thread ended, if it did unexpectedly
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._first: Callable[[], float] | None = None
        self.started: concurrent.futures.Future[float | None] = concurrent.futures.Future()

    # -- lifecycle (any thread) ----------------------------------------------------------------
    def start(self, first: Callable[[], float] | None = None) -> MicroBatcher:
        """Start the worker. It runs ``first`` (the warm-up) before any job, so that every call into the model
        is made from this one thread. ``started`` is resolved by the worker alone, with ``first``'s result or
        error (an error ends the worker: the model never served, so there is nothing to keep alive)."""
        self._first = first
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self.death is None and self._thread.is_alive()

    def close(self, timeout: float | None = 5.0) -> None:
        """Refuse new jobs, fail queued ones (503), stop the running call at its next step, join the worker."""
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            running = list(self._running)
            self._cond.notify_all()
        # Stop the running call first, so that whoever sees the queued 503s also sees it stopping.
        for job in running:
            job.cancel.cancel("server shutting down")
        for job in pending:
            self._post(job, ServiceUnavailable("The server is shutting down."))
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    # -- the loop's side -----------------------------------------------------------------------
    def ticket(self) -> Ticket:
        return Ticket(self)

    def submit(
        self,
        spec: GenerationSpec,
        tasks: Sequence[ImageTask],
        cancel: CancelToken,
        ticket: Ticket | None = None,
    ) -> Job:
        """Queue ``tasks``; await ``job.result``. Call on the event loop that will await it."""
        check_member(tasks)
        loop = asyncio.get_running_loop()
        job = Job(spec, tuple(tasks), cancel, request_id.get(), loop, loop.create_future())
        job.result.add_done_callback(_retrieve)
        with self._cond:
            if ticket is not None and ticket.open:
                ticket.open = False
                self._expected -= 1
            if self.death is not None:
                raise ServiceUnavailable(f"The generation worker stopped ({self.death}); the instance must restart.")
            if self._closed:
                raise ServiceUnavailable("The server is shutting down.")
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def withdraw(self, job: Job, error: BaseException) -> None:
        """Loop side: the request is gone. A queued job leaves the queue now; a running one only stops
        counting (its token is already cancelled or past its deadline)."""
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                return  # running (its batch-mates still want the call) or done: the worker posts its end
        job.settle(error)

    def _expect(self, delta: int) -> None:
        with self._cond:
            self._expected += delta
            self._cond.notify_all()

    # -- the worker ----------------------------------------------------------------------------
    def _post(self, job: Job, outcome: Outcome | BaseException) -> None:
        """Hand an outcome to the job's loop (from any thread); the loop settles it."""
        try:
            job.loop.call_soon_threadsafe(job.settle, outcome)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to answer

    def _work(self) -> None:
        try:
            self.started.set_result(self._first() if self._first is not None else None)
        except BaseException as exc:
            with self._cond:
                self._closed = True
                stranded, self._pending = list(self._pending), deque()
            for job in stranded:  # submitted before start(): never left waiting
                self._post(job, ServiceUnavailable("The model failed its warm-up; the instance must restart."))
            self.started.set_exception(exc)
            return
        try:
            while True:
                batch: list[Job] = []
                try:
                    taken = self._take()
                    if taken is None:
                        return
                    batch = taken
                    self._run(batch)
                except Exception as exc:  # our own bookkeeping failed: fail this call, keep serving
                    metrics.WORKER_ERRORS.inc()
                    log.error("The generation worker failed on a call; its requests get a 500", exc_info=exc)
                    for job in batch:
                        self._post(job, self._failure(job, exc))
                with self._cond:
                    self._running = []
        except BaseException as exc:  # the thread ends here: say so everywhere it matters
            log.critical("The generation worker thread is ending", exc_info=exc)
            self._died(f"{type(exc).__name__}: {exc}"[:300])

    def _died(self, reason: str) -> None:
        metrics.WORKER_DEATHS.inc()
        log.critical("The generation worker thread ended unexpectedly (%s); liveness now fails", reason)
        with self._cond:
            self.death = reason
            stranded = list(self._pending) + list(self._running)
            self._pending.clear()
        if self._on_death is not None:  # first, so that whoever gets a 503 below finds liveness failing
            self._on_death(reason)
        for job in stranded:
            self._post(job, ServiceUnavailable(f"The generation worker stopped ({reason}); retry on another instance."))

    def _take(self) -> list[Job] | None:
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
                        and not job.cancel.stopped
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
        for job in [j for j in self._pending if j.cancel.stopped]:
            self._pending.remove(job)
            self._post(job, _stop_error(job.cancel))

    def _run(self, batch: list[Job]) -> None:
        spec = batch[0].spec
        tasks = [task for job in batch for task in job.tasks]
        token = _SharedToken([job.cancel for job in batch])
        started = time.monotonic()
        # Log lines from inside the backend carry the request ids of the call.
        ctx_token = request_id.set(",".join(job.request_id for job in batch))
        try:
            result = self._generate(spec, tasks, token)
            parts = result.split([len(job.tasks) for job in batch])
        except Exception as exc:
            metrics.STEPS.inc(token.steps_done)
            if isinstance(exc, EndpointError) and token.cancelled and all(job.cancel.stopped for job in batch):
                self._stopped_early(batch, token, spec)
            else:
                self._failed(batch, exc)
            return
        finally:
            request_id.reset(ctx_token)
        elapsed = time.monotonic() - started
        for job, part in zip(batch, parts, strict=True):
            self._post(job, Outcome(part, started - job.enqueued, elapsed, len(batch), len(tasks)))
        metrics.BATCH_SIZE.observe(len(tasks))
        metrics.BATCH_REQUESTS.observe(len(batch))
        metrics.GENERATION_SECONDS.observe(elapsed)
        metrics.IMAGES.inc(len(tasks))
        metrics.STEPS.inc(result.steps_done)
        if elapsed > 0:
            metrics.STEPS_PER_SECOND.set(result.steps_done / elapsed)

    def _stopped_early(self, batch: list[Job], token: _SharedToken, spec: GenerationSpec) -> None:
        metrics.CANCELLED.labels(token.reason or "cancelled").inc()
        log.info(
            "Generation stopped after %d of %d denoising steps: %s",
            token.steps_done,
            spec.steps,
            token.reason or "cancelled",
            extra={"requests": len(batch)},
        )
        for job in batch:
            self._post(job, _stop_error(job.cancel))

    def _failed(self, batch: list[Job], exc: Exception) -> None:
        if len(batch) > 1:
            # One bad request must not fail its batch-mates: run each alone, so only its own call fails.
            log.warning(
                "A merged call of %d requests failed (%s: %s); running each request alone",
                len(batch),
                type(exc).__name__,
                exc,
            )
            for job in batch:
                if job.cancel.stopped:
                    self._post(job, _stop_error(job.cancel))
                else:
                    with self._cond:
                        self._running = [job]
                    self._run([job])
            return
        job = batch[0]
        if isinstance(exc, EndpointError):
            log.warning("Generation failed: %s", exc.message)
        else:
            log.error("Generation failed", exc_info=exc)
        self._post(job, self._failure(job, exc))

    @staticmethod
    def _failure(job: Job, exc: Exception) -> EndpointError:
        if isinstance(exc, EndpointError):
            return exc
        return GenerationFailed(
            f"Generation failed ({type(exc).__name__}); see the server log for request id {job.request_id}."
        )


def _stop_error(token: CancelToken) -> EndpointError:
    """The token's own error: RequestTimeout past its deadline, GenerationCancelled otherwise."""
    try:
        token.check()
    except EndpointError as exc:
        return exc
    return GenerationCancelled("Generation stopped.")
