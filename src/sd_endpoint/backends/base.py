"""The engine interface: what a backend is asked to do, and nothing of the wire format."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from sd_endpoint.errors import GenerationCancelled, RequestTimeout

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


@dataclass(frozen=True)
class GenerationSpec:
    """Everything that must be equal for images to share one pipeline call."""

    height: int
    width: int
    steps: int
    guidance_scale: float
    scheduler: SchedulerName
    eta: float = 0.0


@dataclass(frozen=True)
class ImageTask:
    """One image to generate. The seed alone fixes its initial noise, whatever shares its batch."""

    prompt: str
    negative_prompt: str | None
    seed: int


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


@runtime_checkable
class Backend(Protocol):
    """A loaded text-to-image engine. Implementations must be safe to call from several threads."""

    name: str

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) the model was trained at; the default output size."""
        ...

    def describe(self) -> dict[str, Any]:
        """What was loaded and why (device, dtype, backend choice), for logs, /ready and metrics."""
        ...

    def prompt_overflows(self, text: str) -> bool:
        """True when the text is longer than the text encoder's window and will be truncated."""
        ...

    def supports(self, spec: GenerationSpec) -> bool:
        """Whether this backend can run the spec (the DeepSpeed path only runs captured shapes)."""
        ...

    def generate(
        self,
        spec: GenerationSpec,
        tasks: Sequence[ImageTask],
        cancel: CancelToken | None = None,
        on_step: StepCallback | None = None,
    ) -> BatchResult:
        """Generate one image per task in one pipeline call, in task order."""
        ...
