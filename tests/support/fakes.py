"""Test doubles for the layers above the model, and for the DeepSpeed engine (which needs CUDA).

``FakeBackend`` stands in for the model in tests of the server, batching and service: each image is a solid
colour computed from its seed and prompt, so a test can tell whose image it got. ``FakeDeepSpeed`` runs the
real diffusers path underneath and can be told to disagree with it; only the engine is faked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from PIL import Image

from sd_endpoint.backends.deepspeed_backend import captured_batch_sizes
from sd_endpoint.backends.diffusers_backend import DiffusersBackend, WarmShape, shape_label
from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask, StepCallback


def colour_of(prompt: str, seed: int) -> tuple[int, int, int]:
    """The colour FakeBackend paints for (prompt, seed)."""
    return (seed % 256, sum(prompt.encode()) % 256, 7)


class FakeBackend:
    """A Backend whose images tell which task made them; counts steps and calls; can block or fail."""

    name = "fake"

    def __init__(self, *, step_seconds: float = 0.0, fail_on: str = "boom") -> None:
        self.step_seconds = step_seconds
        self.fail_on = fail_on
        self.calls: list[tuple[GenerationSpec, list[ImageTask]]] = []
        self.steps_run = 0
        self.gate = threading.Event()
        self.gate.set()  # clear it to hold every call at its start
        self.entered = threading.Event()  # set when a call starts
        self._lock = threading.Lock()

    @property
    def native_size(self) -> tuple[int, int]:
        return (64, 64)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": "cpu", "dtype": "float32", "placement": "test double"}

    def prompt_overflows(self, text: str) -> bool:
        return False

    def supports(self, spec: GenerationSpec) -> bool:
        return True

    def generate(
        self,
        spec: GenerationSpec,
        tasks: Sequence[ImageTask],
        cancel: CancelToken | None = None,
        on_step: StepCallback | None = None,
    ) -> BatchResult:
        with self._lock:
            self.calls.append((spec, list(tasks)))
        self.entered.set()
        self.gate.wait(30)
        if cancel is not None:
            cancel.check()
        if any(self.fail_on in t.prompt for t in tasks):
            raise RuntimeError(f"{self.fail_on}: this prompt always fails")
        started = time.perf_counter()
        steps = 0
        for _ in range(spec.steps):
            if self.step_seconds:
                time.sleep(self.step_seconds)
            steps += 1
            with self._lock:
                self.steps_run += 1
            if cancel is not None:
                cancel.steps_done = steps
                cancel.check()
        images = [Image.new("RGB", (spec.width, spec.height), colour_of(t.prompt, t.seed)) for t in tasks]
        return BatchResult(images, steps, time.perf_counter() - started, [[] for _ in tasks])


class FakeDeepSpeed:
    name = "deepspeed"

    def __init__(
        self, base: DiffusersBackend, shapes: Sequence[WarmShape], *, scale: float = 1.0, nan: bool = False
    ) -> None:
        self.base = base
        self.warm_shapes = list(shapes)
        self.scale = scale
        self.nan = nan
        self.batches: list[int] = []  # images per generate() call that reached this engine
        self.raw_unet = base.raw_unet  # its "injected" blocks are the originals unless a test swaps some
        self.released = False

    def release(self) -> None:
        self.released = True

    def batch_sizes(self, spec: GenerationSpec) -> list[int]:
        return captured_batch_sizes(self.warm_shapes, spec)

    def describe(self) -> dict[str, Any]:
        return {"backend": "deepspeed", "captured_shapes": shape_label(self.warm_shapes)}

    def latents(
        self,
        spec: GenerationSpec,
        tasks: Sequence[ImageTask],
        cancel: CancelToken | None = None,
        on_step: StepCallback | None = None,
        *,
        eager: bool = False,
    ) -> tuple[Any, Any, list[Any], int]:
        pipe, latents, generators, steps = self.base.latents(spec, tasks, cancel, on_step, eager=True)
        latents = latents * self.scale
        if self.nan:
            latents = latents.clone()
            latents.view(-1)[0] = float("nan")
        return pipe, latents, generators, steps

    def generate(
        self,
        spec: GenerationSpec,
        tasks: Sequence[ImageTask],
        cancel: CancelToken | None = None,
        on_step: StepCallback | None = None,
    ) -> BatchResult:
        self.batches.append(len(tasks))
        result = self.base.generate(spec, tasks, cancel, on_step)
        result.notes = [[*n, "fake deepspeed"] for n in result.notes]
        return result
