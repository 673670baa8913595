"""Request-level work types shared by the contract, the batcher and the backends.

A request becomes one ``GenerationSpec`` (what must be equal to share a pipeline call) and one
``ImageTask`` per image; a ``CancelToken`` travels with it; a backend answers with a ``BatchResult``.
Nothing here knows the wire format or the engine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from sd_endpoint.errors import GenerationCancelled, GenerationFailed, RequestTimeout

if TYPE_CHECKING:
    from PIL import Image

SchedulerName = Literal["ddim", "dpm_solver_multistep", "euler", "euler_ancestral", "pndm", "lms"]
SCHEDULER_NAMES: tuple[SchedulerName, ...] = (
    "ddim",
    "dpm_solver_multistep",
    "euler",
    "euler_ancestral",
    "pndm",
    "lms",
)
# Schedulers whose step() takes eta; for the others a non-zero eta would be silently ignored.
SCHEDULERS_WITH_ETA: frozenset[str] = frozenset({"ddim"})

# The task follows from the request's columns: "image" -> image-to-image, "image" + "mask_image" -> inpainting.
TaskName = Literal["text-to-image", "image-to-image", "inpainting"]


MAX_CACHE_INTERVAL = 10  # beyond ~5 the image drifts visibly (README, DeepCache); 10 bounds the experiment


@dataclass(frozen=True)
class GenerationSpec:
    """Everything that must be equal for images to share one pipeline call."""

    height: int
    width: int
    steps: int
    guidance_scale: float
    scheduler: SchedulerName
    eta: float = 0.0
    task: TaskName = "text-to-image"
    # Image-to-image and inpainting: the fraction of the schedule that runs, from the noised input image
    # (1.0: from pure noise). Text-to-image always runs the whole schedule.
    strength: float = 1.0
    # DeepCache (backends/deepcache.py): the full UNet every N steps, its deep features reused in between;
    # 1 is off. Part of the spec, so only requests with equal intervals share a pipeline call.
    cache_interval: int = 1

    @property
    def denoising_steps(self) -> int:
        """UNet steps this spec runs: diffusers skips the first (1 - strength) of the schedule."""
        if self.task == "text-to-image":
            return self.steps
        return min(int(self.steps * self.strength), self.steps)


@dataclass(frozen=True)
class ImageTask:
    """One image to generate. The seed alone fixes its initial noise, whatever shares its batch."""

    prompt: str
    negative_prompt: str | None
    seed: int
    # Image-to-image and inpainting: the RGB input and the single-channel mask (white = repaint), both
    # already at the spec's height x width (the contract resized them).
    image: Image.Image | None = field(default=None, repr=False)
    mask: Image.Image | None = field(default=None, repr=False)


class CancelToken:
    """Stops a generation between denoising steps: on request (client gone) or at a deadline."""

    def __init__(self, deadline: float | None = None) -> None:
        self._event = threading.Event()
        self.deadline = deadline  # time.monotonic() value
        self.reason = ""
        self.steps_done = 0

    @classmethod
    def with_timeout_ms(cls, timeout_ms: float | None) -> CancelToken:
        return cls(None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0)

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    @property
    def stopped(self) -> bool:
        """Whether ``check()`` would raise now (cancelled, or past the deadline), without raising."""
        return self._event.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline)

    def check(self) -> None:
        """Raise if the work should stop now; backends call this between steps."""
        if not self._event.is_set() and self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = "timeout"
            self._event.set()
        if self._event.is_set():
            # Several threads may check one token: whoever sees it first, a timeout is always a 408.
            if self.reason == "timeout":
                raise RequestTimeout(
                    f"Generation stopped after {self.steps_done} denoising steps: the request timeout passed."
                )
            raise GenerationCancelled(f"Generation stopped: {self.reason}.")


StepCallback = Callable[[int, int], None]  # (step index starting at 1, total steps)


@dataclass
class BatchResult:
    images: list[Image.Image]
    steps_done: int
    seconds: float
    # Per-image notes from the backend, e.g. "decoded again in fp32 after NaNs in fp16".
    notes: list[list[str]] = field(default_factory=list)

    def expect(self, tasks: int) -> None:
        """Raise GenerationFailed unless there is exactly one image per task (checked wherever one is read)."""
        if len(self.images) != tasks:
            raise GenerationFailed(f"The backend returned {len(self.images)} images for {tasks} tasks.")

    def split(self, sizes: list[int]) -> list[BatchResult]:
        """The results of consecutive task groups of these ``sizes`` (a merged call's members), notes kept."""
        self.expect(sum(sizes))
        parts, offset = [], 0
        for n in sizes:
            notes = self.notes[offset : offset + n] if self.notes else [[] for _ in range(n)]
            parts.append(BatchResult(self.images[offset : offset + n], self.steps_done, self.seconds, notes))
            offset += n
        return parts
