"""The fast loader's readers: a staging buffer is not overwritten while its upload may still read it."""

from __future__ import annotations

import torch

from sd_endpoint.model.weight_reader import StagingRing


def test_a_staging_buffer_is_reused_only_after_its_upload_finished() -> None:
    class Event:
        def __init__(self) -> None:
            self.done = False

        def synchronize(self) -> None:
            self.done = True

    ring = StagingRing(torch, pinned=False, slots=2)
    first = ring.acquire()
    first.event = Event()  # an upload from it is in flight
    second = ring.acquire()
    assert second is not first and not first.event.done  # the other buffer: no wait
    pending = first.event
    again = ring.acquire()
    assert again is first and pending.done and again.event is None  # waited for the copy first
