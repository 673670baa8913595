"""Routing between the DeepSpeed path and the diffusers path, batch by batch.

When the DeepSpeed path serves, ``RoutingBackend`` sends each batch to it only for the shapes it captured
(CUDA graphs are per shape) and everything else to the diffusers path, which also takes every request
with DeepCache on (``cache_interval`` > 1: the captured graphs run the whole UNet every step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sd_endpoint.backends.base import Backend
from sd_endpoint.backends.diffusers_backend import DiffusersBackend
from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask, StepCallback


class FastBackend(Protocol):
    """What the router needs from the DeepSpeed path (a DiffusersBackend subclass; tests use fakes)."""

    name: str
    raw_unet: Any  # the injected UNet (checks.layer_check compares its blocks with the originals)

    def batch_sizes(self, spec: GenerationSpec) -> list[int]: ...

    def describe(self) -> dict[str, Any]: ...

    def latents(
        self,
        spec: GenerationSpec,
        tasks: Sequence[ImageTask],
        cancel: CancelToken | None = None,
        on_step: StepCallback | None = None,
        *,
        eager: bool = False,
    ) -> tuple[Any, Any, list[Any], int]: ...

    def generate(
        self,
        spec: GenerationSpec,
        tasks: Sequence[ImageTask],
        cancel: CancelToken | None = None,
        on_step: StepCallback | None = None,
    ) -> BatchResult: ...

    def release(self) -> None:
        """Free what only this path holds (graphs, DeepSpeed's workspace); it serves nothing after."""
        ...


def split_batch(n: int, sizes: Sequence[int]) -> tuple[list[int], int]:
    """Cut ``n`` images into captured batch sizes, largest first; returns (chunks, images left over)."""
    chunks: list[int] = []
    left = n
    for size in sorted(set(sizes), reverse=True):
        while size <= left:
            chunks.append(size)
            left -= size
    return chunks, left


class RoutingBackend:
    """The DeepSpeed path for the shapes it captured, the diffusers path for everything else.

    A batch whose size was not captured is cut into captured sizes (an image depends only on its seed,
    whatever it is batched with); what cannot be cut that way goes to the diffusers path.
    """

    name = "deepspeed"

    def __init__(self, fast: FastBackend, fallback: DiffusersBackend, reason: str) -> None:
        self.fast = fast
        self.fallback = fallback
        self.reason = reason
        self.routed = {"deepspeed": 0, "diffusers": 0}  # images, for describe()

    @property
    def native_size(self) -> tuple[int, int]:
        return self.fallback.native_size

    def prompt_overflows(self, text: str) -> bool:
        return self.fallback.prompt_overflows(text)

    def supports(self, spec: GenerationSpec) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        info = dict(self.fallback.describe())
        fast = self.fast.describe()
        info.update({k: v for k, v in fast.items() if k not in ("backend", "backend_reason")})
        info["backend"] = self.name
        info["backend_reason"] = self.reason
        info["other_shapes"] = "diffusers path (eager)"
        return info

    def plan(self, spec: GenerationSpec, n: int) -> tuple[list[int], int]:
        sizes = [] if spec.cache_interval > 1 else self.fast.batch_sizes(spec)
        return split_batch(n, sizes) if sizes else ([], n)

    def generate(
        self,
        spec: GenerationSpec,
        tasks: Sequence[ImageTask],
        cancel: CancelToken | None = None,
        on_step: StepCallback | None = None,
    ) -> BatchResult:
        chunks, left = self.plan(spec, len(tasks))
        if not chunks:
            self.routed["diffusers"] += len(tasks)
            return self.fallback.generate(spec, tasks, cancel, on_step)
        runs: list[tuple[Backend | FastBackend, Sequence[ImageTask]]] = []
        start = 0
        for size in chunks:
            runs.append((self.fast, tasks[start : start + size]))
            start += size
        if left:
            runs.append((self.fallback, tasks[start:]))
        total = spec.steps * len(runs)
        images: list[Any] = []
        notes: list[list[str]] = []
        steps = 0
        seconds = 0.0
        for index, (engine, part) in enumerate(runs):
            progress = None if on_step is None else _offset_progress(on_step, index * spec.steps, total)
            result = engine.generate(spec, part, cancel, progress)
            self.routed["deepspeed" if engine is self.fast else "diffusers"] += len(part)
            images.extend(result.images)
            notes.extend(result.notes or [[] for _ in result.images])
            steps = result.steps_done
            seconds += result.seconds
        return BatchResult(images, steps, seconds, notes)


def _offset_progress(on_step: StepCallback, offset: int, total: int) -> StepCallback:
    """Progress of one run of several, reported as steps of the whole request."""

    def progress(step: int, _total: int) -> None:
        on_step(offset + step, total)

    return progress
