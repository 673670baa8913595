"""Micro-batching (sd_endpoint.server.microbatch): one worker owns the model, the event loop waits.

Driven deterministically: a ``FakeBackend`` whose calls can be held at their start (``gate``) lets a test
line jobs up before the worker looks at them. The pixel test uses the real tiny model: merged images must
equal the images each request gets alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from sd_endpoint import metrics
from sd_endpoint.errors import (
    GenerationCancelled,
    GenerationFailed,
    InvalidRequest,
    RequestTimeout,
    ServiceUnavailable,
)
from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask, StepCallback
from sd_endpoint.server import microbatch
from sd_endpoint.server.microbatch import Job, MicroBatcher, Outcome
from tests.support.fakes import FakeBackend, colour_of

SPEC = GenerationSpec(64, 64, 3, 7.5, "ddim", 0.0)


def tasks(prompt: str, *seeds: int) -> list[ImageTask]:
    return [ImageTask(prompt, None, s) for s in seeds]


async def until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def counter(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


class Request:
    """What a route does with a job: submit it and await its outcome (kept, or the error it ended with)."""

    def __init__(self, batcher: MicroBatcher, spec: GenerationSpec, job: Sequence[ImageTask], cancel: Any) -> None:
        self.job: Job = batcher.submit(spec, job, cancel or CancelToken())
        self.task = asyncio.ensure_future(self._wait())
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None

    async def _wait(self) -> None:
        try:
            self.outcome = await asyncio.wait_for(asyncio.shield(self.job.result), 60)
        except BaseException as exc:
            self.error = exc

    async def done(self) -> Request:
        await self.task
        return self

    def colours(self) -> list[tuple[int, int, int]]:
        assert self.outcome is not None, self.error
        return [im.getpixel((0, 0)) for im in self.outcome.result.images]  # type: ignore[misc]


def submit(
    batcher: MicroBatcher, spec: GenerationSpec, job: Sequence[ImageTask], cancel: CancelToken | None = None
) -> Request:
    return Request(batcher, spec, job, cancel)


@asynccontextmanager
async def started(fake: FakeBackend, **options: Any) -> AsyncIterator[MicroBatcher]:
    options = {"max_batch_size": 4, "batch_wait_s": 0.0, **options}
    batcher = MicroBatcher(fake.generate, **options).start()
    try:
        yield batcher
    finally:
        fake.gate.set()
        await asyncio.to_thread(batcher.close, 30.0)


async def hold_worker(fake: FakeBackend, batcher: MicroBatcher) -> Request:
    """Occupy the worker with one call held at its start, so that later jobs queue up."""
    fake.gate.clear()
    fake.entered.clear()
    first = submit(batcher, SPEC, tasks("first", 1))
    await until(fake.entered.is_set, "the first call to start")
    return first


def prompts_per_call(fake: FakeBackend) -> list[list[str]]:
    return [[t.prompt for t in call_tasks] for _, call_tasks in fake.calls]


# ------------------------------------------------------------------------------------------------
# Merging


def test_equal_specs_merge_into_one_call_and_each_request_gets_its_own_images() -> None:
    fake = FakeBackend()

    async def scenario() -> None:
        async with started(fake) as batcher:
            first = await hold_worker(fake, batcher)
            a = submit(batcher, SPEC, tasks("a", 10))
            b = submit(batcher, SPEC, tasks("b", 20, 21))
            c = submit(batcher, SPEC, tasks("c", 30))
            assert batcher.queued == 3
            fake.gate.set()
            for request in (first, a, b, c):
                assert (await request.done()).error is None
            assert [len(t) for _, t in fake.calls] == [1, 4]  # the three queued jobs ran as one call
            assert a.colours() == [colour_of("a", 10)]
            assert b.colours() == [colour_of("b", 20), colour_of("b", 21)]
            assert c.colours() == [colour_of("c", 30)]
            assert a.outcome is not None and (a.outcome.batch_requests, a.outcome.batch_images) == (3, 4)

    asyncio.run(scenario())


def test_different_specs_are_not_merged() -> None:
    fake = FakeBackend()
    other = GenerationSpec(64, 64, 4, 7.5, "ddim", 0.0)

    async def scenario() -> None:
        async with started(fake) as batcher:
            first = await hold_worker(fake, batcher)
            rest = [submit(batcher, SPEC, tasks("a", 1)), submit(batcher, other, tasks("b", 2))]
            rest.append(submit(batcher, SPEC, tasks("c", 3)))
            fake.gate.set()
            for request in (first, *rest):
                assert (await request.done()).error is None
        # a and c merged; b (the oldest left) ran next, alone
        assert [(spec.steps, len(t)) for spec, t in fake.calls] == [(3, 1), (3, 2), (4, 1)]

    asyncio.run(scenario())


def test_batches_are_capped_and_requests_never_split() -> None:
    fake = FakeBackend()

    async def scenario() -> None:
        async with started(fake) as batcher:
            first = await hold_worker(fake, batcher)
            jobs = [submit(batcher, SPEC, tasks(p, 1, 2)) for p in ("a", "b", "c")]
            big = submit(batcher, SPEC, tasks("big", *range(6)))  # over max_batch_size: runs alone, whole
            fake.gate.set()
            for request in (first, *jobs, big):
                assert (await request.done()).error is None
            assert [len(t) for _, t in fake.calls] == [1, 4, 2, 6]
            assert big.colours() == [colour_of("big", s) for s in range(6)]

    asyncio.run(scenario())


def test_batch_size_one_turns_merging_off() -> None:
    fake = FakeBackend()

    async def scenario() -> None:
        async with started(fake, max_batch_size=1, batch_wait_s=1.0) as batcher:
            first = await hold_worker(fake, batcher)
            others = [submit(batcher, SPEC, tasks(p, 1)) for p in ("a", "b", "c")]
            fake.gate.set()
            for request in (first, *others):
                assert (await request.done()).error is None
        assert [len(t) for _, t in fake.calls] == [1, 1, 1, 1]

    asyncio.run(scenario())


def test_the_worker_waits_only_for_admitted_requests() -> None:
    fake = FakeBackend()

    async def scenario() -> None:
        async with started(fake, batch_wait_s=600.0) as batcher:
            # Alone: no admitted request is pending, so the long batch wait is not paid.
            assert (await submit(batcher, SPEC, tasks("alone", 1)).done()).error is None
            assert [len(t) for _, t in fake.calls] == [1]
            # Two admitted requests: the first submitted waits for the second, and they share a call.
            one, two = batcher.ticket(), batcher.ticket()
            a = Request(batcher, SPEC, tasks("a", 1), None)
            one.close()
            await until(lambda: batcher.queued == 0, "the worker to take the job")
            b = Request(batcher, SPEC, tasks("b", 2), None)
            two.close()
            assert (await a.done()).error is None and (await b.done()).error is None
            assert [len(t) for _, t in fake.calls] == [1, 2]
            assert a.outcome is not None and a.outcome.batch_requests == 2

    asyncio.run(scenario())


class NotingBackend(FakeBackend):
    """FakeBackend that returns one note per image, naming the image, like the fp16 NaN re-decode does."""

    def generate(
        self,
        spec: GenerationSpec,
        tasks: Sequence[ImageTask],
        cancel: CancelToken | None = None,
        on_step: StepCallback | None = None,
    ) -> BatchResult:
        result = super().generate(spec, tasks, cancel, on_step)
        result.notes = [[f"note for {t.prompt}/{t.seed}"] for t in tasks]
        return result


def test_each_member_of_a_merged_call_gets_its_own_notes() -> None:
    """Breaks if BatchResult.split drops the notes or hands every member the first member's."""
    fake = NotingBackend()

    async def scenario() -> None:
        async with started(fake) as batcher:
            first = await hold_worker(fake, batcher)
            a = submit(batcher, SPEC, tasks("a", 1, 2))
            b = submit(batcher, SPEC, tasks("b", 3))
            fake.gate.set()
            for request in (first, a, b):
                await request.done()
            assert len(fake.calls) == 2
            assert a.outcome is not None and b.outcome is not None
            assert a.outcome.result.notes == [["note for a/1"], ["note for a/2"]]
            assert b.outcome.result.notes == [["note for b/3"]]

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------
# Failure and cancellation


def test_a_failing_request_does_not_fail_its_batch_mates() -> None:
    fake = FakeBackend()

    async def scenario() -> None:
        async with started(fake) as batcher:
            first = await hold_worker(fake, batcher)
            good1 = submit(batcher, SPEC, tasks("good one", 1))
            bad = submit(batcher, SPEC, tasks("boom", 2))
            good2 = submit(batcher, SPEC, tasks("good two", 3))
            fake.gate.set()
            for request in (first, good1, bad, good2):
                await request.done()
            assert isinstance(bad.error, GenerationFailed)
            assert "RuntimeError" in str(bad.error) and "request id" in str(bad.error)
            assert good1.error is None and good1.colours() == [colour_of("good one", 1)]
            assert good2.error is None and good2.colours() == [colour_of("good two", 3)]
        # The merged call failed, then each request ran alone: only the faulty one failed again.
        assert prompts_per_call(fake)[1:] == [["good one", "boom", "good two"], ["good one"], ["boom"], ["good two"]]

    asyncio.run(scenario())


def test_a_prompt_the_model_cannot_encode_never_joins_a_merge() -> None:
    """Breaks if check_member is not called in submit: the bad member fails the merged call and its
    batch-mate is generated twice."""

    class StrictBackend(FakeBackend):
        def generate(self, spec: Any, tasks: Any, cancel: Any = None, on_step: Any = None) -> BatchResult:
            for t in tasks:
                t.prompt.encode("utf-8")  # what the tokenizer does: a lone surrogate raises
            return super().generate(spec, tasks, cancel, on_step)

    fake = StrictBackend()

    async def scenario() -> None:
        async with started(fake) as batcher:
            first = await hold_worker(fake, batcher)
            with pytest.raises(InvalidRequest, match="surrogate"):
                batcher.submit(SPEC, tasks("bad \ud800", 1), CancelToken())
            good = submit(batcher, SPEC, tasks("good", 2))
            fake.gate.set()
            assert (await first.done()).error is None and (await good.done()).error is None
        assert prompts_per_call(fake) == [["first"], ["good"]]

    asyncio.run(scenario())


def test_a_cancelled_member_does_not_stop_its_batch_mates() -> None:
    """Breaks if _SharedToken fires when any (not all) member stopped: the stayer's call is cut and run again."""
    fake = FakeBackend(step_seconds=0.01)
    steps = 100
    spec = GenerationSpec(64, 64, steps, 7.5, "ddim", 0.0)

    async def scenario() -> None:
        async with started(fake) as batcher:
            first = await hold_worker(fake, batcher)
            leaver_token = CancelToken()
            leaver = submit(batcher, spec, tasks("leaver", 1), leaver_token)
            stayer = submit(batcher, spec, tasks("stayer", 2))
            fake.gate.set()
            await first.done()
            await until(lambda: len(fake.calls) == 2 and fake.steps_run > SPEC.steps, "the merged call to run")
            leaver_token.cancel("client disconnected")  # what the route does when the client goes ...
            batcher.withdraw(leaver.job, GenerationCancelled("gone"))  # ... and it is running: no-op
            assert (await stayer.done()).error is None
            assert stayer.colours() == [colour_of("stayer", 2)]
            assert stayer.outcome is not None and stayer.outcome.result.steps_done == steps  # ran to the end
            assert isinstance((await leaver.done()).error, GenerationCancelled) or leaver.outcome is not None
        assert [len(t) for _, t in fake.calls] == [1, 2]  # one merged call, never re-run

    asyncio.run(scenario())


def test_the_call_stops_at_the_next_step_when_every_member_has_stopped() -> None:
    fake = FakeBackend(step_seconds=0.01)
    steps = 1000  # at least 10 s if it ran to the end
    spec = GenerationSpec(64, 64, steps, 7.5, "ddim", 0.0)
    before = counter("sd_generations_stopped_total", reason="timeout")

    async def scenario() -> None:
        async with started(fake) as batcher:
            timed_out = submit(batcher, spec, tasks("slow", 1), CancelToken.with_timeout_ms(200))
            assert isinstance((await timed_out.done()).error, RequestTimeout)
            await until(lambda: counter("sd_generations_stopped_total", reason="timeout") == before + 1, "the stop")
            assert 0 < fake.steps_run < steps
            ran = fake.steps_run
            await asyncio.sleep(0.1)
            assert fake.steps_run == ran  # nothing runs on after the stop

    asyncio.run(scenario())


def test_a_job_withdrawn_while_queued_never_runs_and_finishes_at_once() -> None:
    fake = FakeBackend()

    async def scenario() -> None:
        async with started(fake) as batcher:
            first = await hold_worker(fake, batcher)
            token = CancelToken()
            gone = submit(batcher, SPEC, tasks("gone", 1), token)
            token.cancel("client disconnected")
            batcher.withdraw(gone.job, GenerationCancelled("The client closed the connection."))
            assert isinstance((await gone.done()).error, GenerationCancelled)
            assert batcher.queued == 0 and gone.job.finished  # withdrawn at once, not left for the worker
            after = submit(batcher, SPEC, tasks("after", 2))
            fake.gate.set()
            assert (await first.done()).error is None and (await after.done()).error is None
        assert all("gone" not in prompts for prompts in prompts_per_call(fake))

    asyncio.run(scenario())


def test_close_fails_queued_jobs_and_stops_the_running_call() -> None:
    fake = FakeBackend()

    async def scenario() -> None:
        batcher = MicroBatcher(fake.generate, max_batch_size=1, batch_wait_s=0.0).start()
        running = await hold_worker(fake, batcher)
        queued = submit(batcher, SPEC, tasks("queued", 1))
        closer = asyncio.ensure_future(asyncio.to_thread(batcher.close, 30.0))
        assert isinstance((await queued.done()).error, ServiceUnavailable)
        fake.gate.set()
        assert isinstance((await running.done()).error, GenerationCancelled)
        await closer
        with pytest.raises(ServiceUnavailable):
            batcher.submit(SPEC, tasks("late", 1), CancelToken())

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------
# Supervision


class Boom(Exception):
    pass


FAULT_POINTS = {
    # where: (what to break, how). Each is a point of the worker's iteration our own code could fail at.
    "taking a job": (microbatch.MicroBatcher, "_drop_stopped"),
    "splitting the result": (BatchResult, "split"),
    "counting images": (metrics.IMAGES, "inc"),
    "observing the batch size": (metrics.BATCH_SIZE, "observe"),
    "logging a stop": (microbatch.MicroBatcher, "_stopped_early"),
}


@pytest.mark.parametrize("where", list(FAULT_POINTS))
def test_a_failure_anywhere_in_an_iteration_leaves_the_worker_alive_and_answers_everyone_once(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Breaks if _work stops wrapping an iteration: the exception ends the thread and later jobs hang."""
    fake = FakeBackend()
    target, name = FAULT_POINTS[where]
    calls = {"n": 0}
    original = getattr(target, name)

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Boom(f"injected at {where}")
        return original(*args, **kwargs)

    settled: list[tuple[int, int]] = []  # (job id, thread id) of every settle call that answered a job
    real_settle = Job.settle

    def recording_settle(self: Job, outcome: Any) -> None:
        if not self.result.done():
            settled.append((id(self), threading.get_ident()))
        real_settle(self, outcome)

    monkeypatch.setattr(Job, "settle", recording_settle)

    async def scenario() -> None:
        async with started(fake) as batcher:
            monkeypatch.setattr(target, name, broken)
            if where == "logging a stop":
                token = CancelToken()
                token.cancel("gone")
                first = submit(batcher, SPEC, tasks("first", 1), CancelToken.with_timeout_ms(100))
                fake.step_seconds = 0.05
            else:
                first = submit(batcher, SPEC, tasks("first", 1))
            await first.done()
            fake.step_seconds = 0.0
            later = [await submit(batcher, SPEC, tasks(f"later {i}", i)).done() for i in range(3)]
            assert batcher.alive
            assert first.error is not None or first.outcome is not None
            for request in later:
                assert request.error is None, request.error
            loop_thread = threading.get_ident()
            assert len(settled) == len({job for job, _ in settled}) == 4  # each request answered once ...
            assert {thread for _, thread in settled} == {loop_thread}  # ... and only by the event loop

    asyncio.run(scenario())


def test_a_dead_worker_fails_queued_requests_at_once_and_refuses_new_ones() -> None:
    """Breaks if _work stops catching what ends the thread: queued requests then wait for their deadline."""

    class Fatal(BaseException):
        pass

    class DyingBackend(FakeBackend):
        def generate(self, spec: Any, tasks: Any, cancel: Any = None, on_step: Any = None) -> BatchResult:
            result = super().generate(spec, tasks, cancel, on_step)
            if tasks[0].prompt == "fatal":
                raise Fatal("the worker thread is killed")
            return result

    fake = DyingBackend()
    deaths: list[str] = []
    before = counter("sd_worker_deaths_total")

    async def scenario() -> None:
        batcher = MicroBatcher(fake.generate, max_batch_size=1, on_death=deaths.append).start()
        try:
            fake.gate.clear()
            fake.entered.clear()
            fatal = submit(batcher, SPEC, tasks("fatal", 1))
            await until(fake.entered.is_set, "the fatal call to start")
            queued = submit(batcher, SPEC, tasks("queued", 2), CancelToken.with_timeout_ms(600_000))
            fake.gate.set()
            for request in (fatal, queued):
                await request.done()
                assert isinstance(request.error, ServiceUnavailable), request.error
            assert not batcher.alive and deaths and "Fatal" in deaths[0]
            with pytest.raises(ServiceUnavailable, match="worker stopped"):
                batcher.submit(SPEC, tasks("late", 3), CancelToken())
        finally:
            batcher.close(5)

    asyncio.run(scenario())
    assert counter("sd_worker_deaths_total") == before + 1


# ------------------------------------------------------------------------------------------------
# The real model


def test_merged_images_equal_solo_images_on_the_tiny_model(backend: Any) -> None:
    """CPU fp32: a request's images are the same whether it runs alone or merged (within 1 of 255)."""
    jobs = [
        [ImageTask("a red fox in the snow", None, 11)],
        [ImageTask("a lighthouse at dawn", "blurry", 22), ImageTask("a lighthouse at dawn", "blurry", 23)],
        [ImageTask("a bowl of fruit", None, 33)],
    ]
    solo = [backend.generate(SPEC, job).images for job in jobs]
    calls: list[int] = []

    def recording(spec: GenerationSpec, job: Sequence[ImageTask], cancel: CancelToken | None) -> BatchResult:
        calls.append(len(job))
        result: BatchResult = backend.generate(spec, job, cancel)
        return result

    async def scenario() -> list[Request]:
        batcher = MicroBatcher(recording, max_batch_size=8, batch_wait_s=0.0)
        requests = [submit(batcher, SPEC, job) for job in jobs]
        batcher.start()  # the worker finds all three at once
        try:
            return [await r.done() for r in requests]
        finally:
            await asyncio.to_thread(batcher.close, 30.0)

    merged = asyncio.run(scenario())
    assert calls == [4]
    for request, alone in zip(merged, solo, strict=True):
        assert request.outcome is not None, request.error
        for merged_image, solo_image in zip(request.outcome.result.images, alone, strict=True):
            diff = np.abs(np.asarray(merged_image, np.int16) - np.asarray(solo_image, np.int16))
            assert diff.max() <= 1
    # The images differ between requests, so the comparison above can fail.
    assert np.abs(np.asarray(solo[0][0], np.int16) - np.asarray(solo[2][0], np.int16)).max() > 1


def test_the_warm_up_runs_first_on_the_worker_thread() -> None:
    """Breaks if the warm-up ran outside the worker (state._load_and_warm_up calling service.warmup itself)."""
    seen: list[tuple[str, str]] = []
    fake = FakeBackend()

    def recording(spec: GenerationSpec, job: Sequence[ImageTask], cancel: CancelToken | None) -> BatchResult:
        seen.append((job[0].prompt, threading.current_thread().name))
        return fake.generate(spec, job, cancel)

    def warm_up() -> float:
        recording(SPEC, tasks("warm-up", 0), None)
        return 1.5

    async def scenario() -> None:
        batcher = MicroBatcher(recording, max_batch_size=1, name="the-worker")
        queued = submit(batcher, SPEC, tasks("queued before start", 1))  # waits for the warm-up, then runs
        batcher.start(first=warm_up)
        try:
            assert await asyncio.to_thread(batcher.started.result, 30) == 1.5
            await queued.done()
        finally:
            await asyncio.to_thread(batcher.close, 5.0)

    asyncio.run(scenario())
    assert seen == [("warm-up", "the-worker"), ("queued before start", "the-worker")]


def test_a_failed_warm_up_is_reported_once_and_nothing_is_served() -> None:
    def broken() -> float:
        raise RuntimeError("the device is gone")

    async def scenario() -> None:
        batcher = MicroBatcher(FakeBackend().generate)
        early = submit(batcher, SPEC, tasks("queued before start", 1))
        batcher.start(first=broken)
        with pytest.raises(RuntimeError, match="device is gone"):
            await asyncio.to_thread(batcher.started.result, 30)
        await early.done()
        assert isinstance(early.error, ServiceUnavailable), early.error  # answered, not left waiting
        with pytest.raises(ServiceUnavailable):
            batcher.submit(SPEC, tasks("after", 1), CancelToken())
        await asyncio.to_thread(batcher.close, 5.0)

    asyncio.run(scenario())
