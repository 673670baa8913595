"""Admission: how many requests are served at once, and how long the rest may wait. Event loop only.

At most ``max_in_flight`` requests hold a slot (SD_ENDPOINT_MAX_CONCURRENT_REQUESTS), at most ``max_queued``
wait for one, and none waits longer than ``max_wait_s`` (SD_ENDPOINT_MAX_QUEUE_WAIT_MS). Anything past that
is refused at once with ``Overloaded`` (429 + Retry-After), so memory stays bounded whatever the load.

A slot is a ``Slot`` object released exactly once: a second ``release`` does nothing, so a double release
cannot hand out a slot that is still held (the old counter was clamped at zero, which hid one).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from sd_endpoint import metrics
from sd_endpoint.errors import Overloaded, RequestTimeout


class Slot:
    """One admitted request's place; ``release`` gives it to the next waiter or back to the pool."""

    def __init__(self, gate: AdmissionControl, waited_s: float) -> None:
        self._gate = gate
        self.waited_s = waited_s
        self.held_from = time.monotonic()
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self._gate._hand_on(time.monotonic() - self.held_from)


class AdmissionControl:
    """A bounded number of requests in flight, with a bounded queue in front of them (no locks: loop only)."""

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

    async def acquire(self, deadline: float | None = None) -> Slot:
        """Take a slot, waiting in the queue if allowed.

        Raises ``Overloaded`` when the queue is full or the wait would pass ``max_wait_s``; a request deadline
        earlier than that bounds the wait too (``RequestTimeout``: the caller answers 408, not 429).
        """
        if self._in_flight < self.max_in_flight and not self.queued:
            self._in_flight += 1
            self._publish()
            return Slot(self, 0.0)
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
            async with asyncio.timeout(wait):
                await asyncio.shield(waiter)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over in the same instant the wait ended: keep it after a timeout,
                # pass it on when the request itself is gone (cancelled).
                if isinstance(exc, TimeoutError):
                    return Slot(self, time.monotonic() - started)
                self._hand_on(None)
                raise
            waiter.cancel()
            self._publish()
            if isinstance(exc, TimeoutError):
                if by_deadline:
                    raise RequestTimeout(
                        "The request timed out waiting for a free slot (SD_ENDPOINT_REQUEST_TIMEOUT_MS); "
                        "no generation was started."
                    ) from None
                raise self._overloaded() from None
            raise
        return Slot(self, time.monotonic() - started)

    def _hand_on(self, held_s: float | None) -> None:
        """A slot is free: the longest-waiting request gets it, else the in-flight count drops."""
        if held_s is not None:
            self._service_s = 0.8 * self._service_s + 0.2 * held_s
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; in-flight count unchanged
                self._publish()
                return
        if self._in_flight <= 0:
            raise RuntimeError("a slot was released that was never acquired")
        self._in_flight -= 1
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
