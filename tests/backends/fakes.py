"""A stand-in for the DeepSpeed engine, which needs CUDA: it runs the real diffusers path underneath and can
be told to disagree with it. Only the DeepSpeed engine is faked; the diffusers path is the real tiny model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sd_endpoint.backends.deepspeed_backend import captured_batch_sizes
from sd_endpoint.backends.diffusers_backend import DiffusersBackend, WarmShape, shape_label
from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask, StepCallback


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
