"""Admission control and micro-batching (sd_endpoint.batching).

The batching behaviour is driven deterministically: a ``FakeBackend`` whose calls can be held at their
start (``gate``) lets a test line jobs up before the worker looks at them. The pixel test uses the real
tiny model: merged images must equal the images each request gets alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from sd_endpoint import metrics
from sd_endpoint.batching import AdmissionControl, MicroBatcher
from sd_endpoint.errors import (
    GenerationCancelled,
    GenerationFailed,
    Overloaded,
    RequestTimeout,
    ServiceUnavailable,
)
from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask
from tests.support.fakes import FakeBackend, colour_of

SPEC = GenerationSpec(64, 64, 3, 7.5, "ddim", 0.0)


def tasks(prompt: str, *seeds: int) -> list[ImageTask]:
    return [ImageTask(prompt, None, s) for s in seeds]


class Caller:
    """Runs ``batcher.generate`` in a thread and keeps its result or error."""

    def __init__(self, fn: Callable[[], BatchResult]) -> None:
        self.result: BatchResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], BatchResult]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc

    def join(self) -> Caller:
        self.thread.join(60)
        assert not self.thread.is_alive(), "generate() did not return"
        return self


def call(
    batcher: MicroBatcher, spec: GenerationSpec, job: Sequence[ImageTask], cancel: CancelToken | None = None
) -> Caller:
    return Caller(lambda: batcher.generate(spec, job, cancel))


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def colours(result: BatchResult | None) -> list[tuple[int, int, int]]:
    assert result is not None
    return [im.getpixel((0, 0)) for im in result.images]  # type: ignore[misc]


def counter(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def batcher(fake: FakeBackend) -> Any:
    b = MicroBatcher(fake.generate, max_batch_size=4, batch_wait_s=0.0).start()
    yield b
    fake.gate.set()
    b.close()


def hold_worker(fake: FakeBackend, batcher: MicroBatcher) -> Caller:
    """Occupy the worker with one call held at its start, so that later jobs queue up."""
    fake.gate.clear()
    first = call(batcher, SPEC, tasks("first", 1))
    wait_for(fake.entered.is_set, "the first call to start")
    return first


# ------------------------------------------------------------------------------------------------
# Micro-batching


def test_equal_specs_merge_into_one_call_and_each_request_gets_its_own_images(
    fake: FakeBackend, batcher: MicroBatcher
) -> None:
    first = hold_worker(fake, batcher)
    a = call(batcher, SPEC, tasks("a", 10))
    b = call(batcher, SPEC, tasks("b", 20, 21))
    c = call(batcher, SPEC, tasks("c", 30))
    wait_for(lambda: batcher.queued == 3, "three queued jobs")
    fake.gate.set()
    for caller in (first, a, b, c):
        caller.join()
        assert caller.error is None
    assert [len(t) for _, t in fake.calls] == [1, 4]  # the three queued jobs ran as one call
    assert colours(a.result) == [colour_of("a", 10)]
    assert colours(b.result) == [colour_of("b", 20), colour_of("b", 21)]
    assert colours(c.result) == [colour_of("c", 30)]


def test_different_specs_are_not_merged(fake: FakeBackend, batcher: MicroBatcher) -> None:
    other = GenerationSpec(64, 64, 4, 7.5, "ddim", 0.0)
    first = hold_worker(fake, batcher)
    a = call(batcher, SPEC, tasks("a", 1))
    b = call(batcher, other, tasks("b", 2))
    c = call(batcher, SPEC, tasks("c", 3))
    wait_for(lambda: batcher.queued == 3, "three queued jobs")
    fake.gate.set()
    for caller in (first, a, b, c):
        assert caller.join().error is None
    specs_and_sizes = [(spec.steps, len(t)) for spec, t in fake.calls]
    assert specs_and_sizes == [(3, 1), (3, 2), (4, 1)]  # a and c merged; b (oldest left) ran next, alone


def test_batches_are_capped_and_requests_never_split(fake: FakeBackend, batcher: MicroBatcher) -> None:
    first = hold_worker(fake, batcher)
    jobs = [call(batcher, SPEC, tasks(p, 1, 2)) for p in ("a", "b", "c")]
    big = call(batcher, SPEC, tasks("big", *range(6)))  # over max_batch_size: runs alone, whole
    wait_for(lambda: batcher.queued == 4, "four queued jobs")
    fake.gate.set()
    for caller in (first, *jobs, big):
        assert caller.join().error is None
    assert [len(t) for _, t in fake.calls] == [1, 4, 2, 6]
    assert colours(big.result) == [colour_of("big", s) for s in range(6)]


def test_batch_size_one_turns_merging_off(fake: FakeBackend) -> None:
    batcher = MicroBatcher(fake.generate, max_batch_size=1, batch_wait_s=1.0).start()
    try:
        first = hold_worker(fake, batcher)
        others = [call(batcher, SPEC, tasks(p, 1)) for p in ("a", "b", "c")]
        wait_for(lambda: batcher.queued == 3, "three queued jobs")
        fake.gate.set()
        for caller in (first, *others):
            assert caller.join().error is None
        assert [len(t) for _, t in fake.calls] == [1, 1, 1, 1]
    finally:
        batcher.close()


def test_a_failing_request_does_not_fail_its_batch_mates(fake: FakeBackend, batcher: MicroBatcher) -> None:
    first = hold_worker(fake, batcher)
    good1 = call(batcher, SPEC, tasks("good one", 1))
    bad = call(batcher, SPEC, tasks("boom", 2))
    good2 = call(batcher, SPEC, tasks("good two", 3))
    wait_for(lambda: batcher.queued == 3, "three queued jobs")
    fake.gate.set()
    for caller in (first, good1, bad, good2):
        caller.join()
    assert isinstance(bad.error, GenerationFailed)
    assert "RuntimeError" in str(bad.error) and "request id" in str(bad.error)
    assert good1.error is None and colours(good1.result) == [colour_of("good one", 1)]
    assert good2.error is None and colours(good2.result) == [colour_of("good two", 3)]
    # The merged call failed, then each request ran alone: only the faulty one failed again.
    assert [[t.prompt for t in call_tasks] for _, call_tasks in fake.calls[1:]] == [
        ["good one", "boom", "good two"],
        ["good one"],
        ["boom"],
        ["good two"],
    ]


def test_a_cancelled_member_does_not_stop_its_batch_mates(fake: FakeBackend) -> None:
    fake.step_seconds = 0.01
    steps = 100
    spec = GenerationSpec(64, 64, steps, 7.5, "ddim", 0.0)
    batcher = MicroBatcher(fake.generate, max_batch_size=4, batch_wait_s=0.0).start()
    try:
        first = hold_worker(fake, batcher)
        leaver_token = CancelToken()
        leaver = call(batcher, spec, tasks("leaver", 1), leaver_token)
        stayer = call(batcher, spec, tasks("stayer", 2))
        wait_for(lambda: batcher.queued == 2, "two queued jobs")
        fake.gate.set()
        first.join()
        wait_for(lambda: len(fake.calls) == 2 and fake.steps_run > SPEC.steps, "the merged call to run")
        leaver_token.cancel("client disconnected")
        assert isinstance(leaver.join().error, GenerationCancelled)  # answered at once
        assert stayer.join().error is None
        assert colours(stayer.result) == [colour_of("stayer", 2)]
        assert stayer.result is not None and stayer.result.steps_done == steps  # the call ran to the end
    finally:
        batcher.close()


def test_the_call_stops_at_the_next_step_when_every_member_has_stopped(fake: FakeBackend) -> None:
    fake.step_seconds = 0.01
    steps = 1000  # at least 10 s if it ran to the end
    spec = GenerationSpec(64, 64, steps, 7.5, "ddim", 0.0)
    batcher = MicroBatcher(fake.generate, max_batch_size=4, batch_wait_s=0.0).start()
    before = counter("sd_generations_stopped_total", reason="timeout")
    try:
        timed_out = call(batcher, spec, tasks("slow", 1), CancelToken.with_timeout_ms(200))
        assert isinstance(timed_out.join().error, RequestTimeout)
        wait_for(lambda: counter("sd_generations_stopped_total", reason="timeout") == before + 1, "the stop")
        assert 0 < fake.steps_run < steps
        ran = fake.steps_run
        time.sleep(0.1)
        assert fake.steps_run == ran  # nothing runs on after the stop
    finally:
        batcher.close()


def test_a_job_cancelled_while_queued_never_runs(fake: FakeBackend, batcher: MicroBatcher) -> None:
    first = hold_worker(fake, batcher)
    token = CancelToken()
    gone = call(batcher, SPEC, tasks("gone", 1), token)
    wait_for(lambda: batcher.queued == 1, "the queued job")
    token.cancel("client disconnected")
    assert isinstance(gone.join().error, GenerationCancelled)
    assert batcher.queued == 0  # withdrawn at once, not left for the worker
    after = call(batcher, SPEC, tasks("after", 2))
    fake.gate.set()
    assert first.join().error is None and after.join().error is None
    assert all(t.prompt != "gone" for _, call_tasks in fake.calls for t in call_tasks)


def test_the_worker_waits_only_for_admitted_requests(fake: FakeBackend) -> None:
    batcher = MicroBatcher(fake.generate, max_batch_size=4, batch_wait_s=600.0).start()
    try:
        # Alone: no admitted request is pending, so the long batch wait is not paid.
        alone = call(batcher, SPEC, tasks("alone", 1)).join()
        assert alone.error is None and [len(t) for _, t in fake.calls] == [1]
        # Two admitted requests: the first submitted waits for the second, and they share a call.
        with batcher.client() as one, batcher.client() as two:
            a = Caller(lambda: one.generate(SPEC, tasks("a", 1)))
            wait_for(lambda: len(fake.calls) == 1 and batcher.queued == 0, "the worker to take the job")
            b = Caller(lambda: two.generate(SPEC, tasks("b", 2)))
            assert a.join().error is None and b.join().error is None
        assert [len(t) for _, t in fake.calls] == [1, 2]
        assert one.batch_requests == two.batch_requests == 2
    finally:
        batcher.close()


def test_close_fails_queued_jobs_and_stops_the_running_call(fake: FakeBackend) -> None:
    batcher = MicroBatcher(fake.generate, max_batch_size=1, batch_wait_s=0.0).start()
    running = hold_worker(fake, batcher)
    queued = call(batcher, SPEC, tasks("queued", 1))
    wait_for(lambda: batcher.queued == 1, "the queued job")
    closer = threading.Thread(target=batcher.close, args=(30.0,))
    closer.start()
    assert isinstance(queued.join().error, ServiceUnavailable)
    fake.gate.set()
    assert isinstance(running.join().error, GenerationCancelled)
    closer.join(30)
    with pytest.raises(ServiceUnavailable):
        batcher.generate(SPEC, tasks("late", 1))


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

    batcher = MicroBatcher(recording, max_batch_size=8, batch_wait_s=0.0)
    callers = [call(batcher, SPEC, job) for job in jobs]
    wait_for(lambda: batcher.queued == 3, "three queued jobs")
    batcher.start()  # the worker finds all three at once
    try:
        for caller in callers:
            assert caller.join().error is None
    finally:
        batcher.close()
    assert calls == [4]
    for caller, alone in zip(callers, solo, strict=True):
        assert caller.result is not None
        for merged_image, solo_image in zip(caller.result.images, alone, strict=True):
            diff = np.abs(np.asarray(merged_image, np.int16) - np.asarray(solo_image, np.int16))
            assert diff.max() <= 1
    # The images differ between requests, so the comparison above can fail.
    assert np.abs(np.asarray(solo[0][0], np.int16) - np.asarray(solo[2][0], np.int16)).max() > 1


# ------------------------------------------------------------------------------------------------
# Admission


def test_admission_refuses_past_the_limits_and_hands_slots_over_in_order() -> None:
    async def scenario() -> None:
        gate = AdmissionControl(max_in_flight=2, max_queued=1, max_wait_s=60)
        assert await gate.acquire() == 0.0
        assert await gate.acquire() == 0.0
        waiter = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        assert (gate.in_flight, gate.queued) == (2, 1)
        assert metrics.REGISTRY.get_sample_value("sd_requests_queued") == 1
        with pytest.raises(Overloaded) as refused:
            await gate.acquire()
        assert refused.value.status_code == 429
        assert int(refused.value.headers["Retry-After"]) >= 1
        assert "SD_ENDPOINT_MAX_CONCURRENT_REQUESTS" in refused.value.message
        gate.release(0.5)
        assert await waiter > 0.0  # got the freed slot
        assert (gate.in_flight, gate.queued) == (2, 0)
        gate.release()
        gate.release()
        assert gate.in_flight == 0
        assert metrics.REGISTRY.get_sample_value("sd_requests_in_flight") == 0

    asyncio.run(scenario())


def test_admission_bounds_the_queue_wait() -> None:
    async def scenario() -> None:
        gate = AdmissionControl(max_in_flight=1, max_queued=5, max_wait_s=0.05)
        await gate.acquire()
        with pytest.raises(Overloaded):
            await gate.acquire()
        assert (gate.in_flight, gate.queued) == (1, 0)
        no_wait = AdmissionControl(max_in_flight=1, max_queued=5, max_wait_s=0)
        await no_wait.acquire()
        with pytest.raises(Overloaded):
            await no_wait.acquire()

    asyncio.run(scenario())


def test_admission_wait_past_the_request_deadline_is_a_timeout() -> None:
    async def scenario() -> None:
        gate = AdmissionControl(max_in_flight=1, max_queued=5, max_wait_s=600)
        await gate.acquire()
        with pytest.raises(RequestTimeout):
            await gate.acquire(deadline=time.monotonic() + 0.05)
        assert gate.queued == 0

    asyncio.run(scenario())


def test_admission_does_not_leak_slots_when_waiters_are_cancelled() -> None:
    async def scenario() -> None:
        gate = AdmissionControl(max_in_flight=1, max_queued=5, max_wait_s=600)
        await gate.acquire()
        plain = asyncio.create_task(gate.acquire())
        handed = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        plain.cancel()  # gave up while queued
        await asyncio.gather(plain, return_exceptions=True)
        gate.release()  # hands the slot to `handed` ...
        handed.cancel()  # ... which is cancelled before it could run
        (outcome,) = await asyncio.gather(handed, return_exceptions=True)
        if not isinstance(outcome, asyncio.CancelledError):
            # Python 3.11's wait_for returns a result that arrived with the cancel: the caller owns the slot.
            gate.release()
        assert (gate.in_flight, gate.queued) == (0, 0)
        assert await gate.acquire() == 0.0

    asyncio.run(scenario())
