"""Admission control (sd_endpoint.server.admission): bounded in flight, bounded queue, slots released once."""

from __future__ import annotations

import asyncio
import time

import pytest

from sd_endpoint import metrics
from sd_endpoint.errors import Overloaded, RequestTimeout
from sd_endpoint.server.admission import AdmissionControl


def test_admission_refuses_past_the_limits_and_hands_slots_over_in_order() -> None:
    async def scenario() -> None:
        gate = AdmissionControl(max_in_flight=2, max_queued=1, max_wait_s=60)
        one = await gate.acquire()
        two = await gate.acquire()
        assert one.waited_s == two.waited_s == 0.0
        waiter = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        assert (gate.in_flight, gate.queued) == (2, 1)
        assert metrics.REGISTRY.get_sample_value("sd_requests_queued") == 1
        with pytest.raises(Overloaded) as refused:
            await gate.acquire()
        assert refused.value.status_code == 429
        assert int(refused.value.headers["Retry-After"]) >= 1
        assert "SD_ENDPOINT_MAX_CONCURRENT_REQUESTS" in refused.value.message
        one.release()
        three = await waiter
        assert three.waited_s > 0.0  # got the freed slot
        assert (gate.in_flight, gate.queued) == (2, 0)
        two.release()
        three.release()
        assert gate.in_flight == 0
        assert metrics.REGISTRY.get_sample_value("sd_requests_in_flight") == 0

    asyncio.run(scenario())


def test_a_slot_released_twice_is_released_once() -> None:
    """Breaks if Slot.release loses its once-only guard: the second release frees a slot someone holds."""

    async def scenario() -> None:
        gate = AdmissionControl(max_in_flight=1, max_queued=1, max_wait_s=60)
        first = await gate.acquire()
        waiter = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        first.release()
        second = await waiter
        first.release()  # a second release of the same slot (a caller's bug) ...
        assert gate.in_flight == 1  # ... does not free the slot the second request holds
        gate.max_wait_s = 0.0  # no waiting: a request now must find a free slot, and there is none
        with pytest.raises(Overloaded):
            await gate.acquire()
        second.release()
        assert gate.in_flight == 0

    asyncio.run(scenario())


def test_releasing_more_slots_than_were_taken_is_an_error_not_a_clamp() -> None:
    gate = AdmissionControl(max_in_flight=1, max_queued=0, max_wait_s=0)
    with pytest.raises(RuntimeError, match="never acquired"):
        gate._hand_on(None)


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
    """A waiter handed a slot in the same instant it is cancelled passes the slot on (the branch the
    old ``wait_for`` never reached on Python 3.11)."""

    async def scenario() -> None:
        gate = AdmissionControl(max_in_flight=1, max_queued=5, max_wait_s=600)
        held = await gate.acquire()
        plain = asyncio.create_task(gate.acquire())
        handed = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        plain.cancel()  # gave up while queued
        await asyncio.gather(plain, return_exceptions=True)
        held.release()  # hands the slot to `handed` ...
        handed.cancel()  # ... which is cancelled before it could run
        (outcome,) = await asyncio.gather(handed, return_exceptions=True)
        assert isinstance(outcome, asyncio.CancelledError)  # the request is gone ...
        assert (gate.in_flight, gate.queued) == (0, 0)  # ... and its slot went back
        slot = await gate.acquire()
        assert slot.waited_s == 0.0

    asyncio.run(scenario())
