"""Start-up checks of a candidate UNet path against the diffusers path: per layer, end to end, and speed.

* ``layer_check``: the hidden states entering every ``BasicTransformerBlock`` are captured from the
  diffusers UNet at every warm shape; each injected block and its original run on exactly those inputs.
  The error measured is that of the block's update (output minus input), relative to the original's
  update, so the residual stream cannot hide a wrong attention. Tolerance ``LAYER_TOLERANCE`` (1e-2):
  fp16 keeps 11 mantissa bits (rounding 4.9e-4 per operation); two correct fp16 implementations of one
  block differ by a few 1e-3 through summation order and where they round; the faults this exists for
  (DeepSpeed's attention at 144 tokens: 0.76 relative error in the attention output, a swapped GEGLU gate,
  weights in the wrong layout) are tens of percent.
* ``self_check``: the same seeds through both paths for a few steps, relative L2 of the final latents
  (tolerance 0.05), once per warm resolution: catches what no single layer shows (graph replay of stale
  buffers, a block left out). It alone cannot see a wrong mid-block attention: that error injected into
  the full-size random-weight UNet moved its latents by 1.5e-3.
* ``SpeedCheck``: one UNet call at the first warm shape, each path as it would serve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sd_endpoint.jobs import GenerationSpec, ImageTask

WarmShape = tuple[int, int, int]

LAYER_TOLERANCE = 1e-2
SELF_CHECK_TOLERANCE = 0.05
SELF_CHECK_STEPS = 3
SELF_CHECK_PROMPT = "a photograph of an astronaut riding a horse on the moon"
# auto takes the DeepSpeed path only when its UNet step is at least this much faster (timing noise is ~1%).
SPEED_MARGIN = 0.03


class LatentsPath(Protocol):
    def latents(
        self, spec: GenerationSpec, tasks: Sequence[ImageTask], cancel: Any = None, on_step: Any = None
    ) -> tuple[Any, Any, list[Any], int]: ...


# ------------------------------------------------------------------------------------------------
# Per layer


def transformer_blocks(unet: Any) -> dict[str, Any]:
    from diffusers.models.attention import BasicTransformerBlock

    return {n: m for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)}


def capture_block_inputs(unet: Any, shapes: Sequence[WarmShape]) -> dict[tuple[str, WarmShape], tuple[Any, Any]]:
    """(hidden_states, encoder_hidden_states) entering each transformer block, per warm shape."""
    import torch

    from sd_endpoint.backends.unet_runner import UNetRunner, unet_inputs_for

    captured: dict[tuple[str, WarmShape], tuple[Any, Any]] = {}
    current: list[WarmShape] = []

    def hook_for(name: str) -> Any:
        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            captured[(name, current[0])] = (hidden.clone(), None if context is None else context.clone())

        return hook

    handles = [
        block.register_forward_pre_hook(hook_for(name), with_kwargs=True)
        for name, block in transformer_blocks(unet).items()
    ]
    try:
        with torch.inference_mode():
            for shape in dict.fromkeys(shapes):
                current[:] = [shape]
                sample, timestep, context = UNetRunner.dummy(unet_inputs_for(unet, *shape), unet.device, unet.dtype)
                unet(sample, timestep, context, return_dict=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@dataclass(frozen=True)
class LayerError:
    block: str
    shape: WarmShape
    tokens: int
    relative_error: float


@dataclass
class LayerCheck:
    tolerance: float
    errors: list[LayerError] = field(default_factory=list)

    @property
    def failures(self) -> list[LayerError]:
        return [e for e in self.errors if not e.relative_error <= self.tolerance]  # NaN fails

    @property
    def passed(self) -> bool:
        return bool(self.errors) and not self.failures

    @property
    def worst(self) -> LayerError | None:
        return max(self.errors, key=lambda e: e.relative_error if math.isfinite(e.relative_error) else math.inf)

    def describe(self) -> str:
        worst = self.worst
        if worst is None:
            return "no transformer blocks were compared"
        h, w, b = worst.shape
        head = (
            f"{len(self.errors)} block-shapes compared, {len(self.failures)} over {self.tolerance:.0e}; worst "
            f"{worst.block} at {h}x{w}x{b} ({worst.tokens} tokens): {worst.relative_error:.2e} relative error"
        )
        return head


def layer_check(
    reference: Any, candidate: Any, shapes: Sequence[WarmShape], *, tolerance: float = LAYER_TOLERANCE
) -> LayerCheck:
    """Each transformer block of ``candidate`` (an injected copy of ``reference``) against the original."""
    import torch

    originals = transformer_blocks(reference)
    injected = dict(candidate.named_modules())
    check = LayerCheck(tolerance)
    for (name, shape), (hidden, context) in capture_block_inputs(reference, shapes).items():
        with torch.inference_mode():
            want = originals[name](hidden, encoder_hidden_states=context).float() - hidden.float()
            got = injected[name](hidden, encoder_hidden_states=context).float() - hidden.float()
        if bool(torch.isfinite(got).all()):
            rel = float((got - want).norm() / want.norm().clamp_min(1e-12))
        else:
            rel = math.nan
        check.errors.append(LayerError(name, shape, int(hidden.shape[1]), rel))
    return check


# ------------------------------------------------------------------------------------------------
# End to end


@dataclass(frozen=True)
class SelfCheck:
    passed: bool
    relative_error: float
    tolerance: float
    shape: WarmShape
    steps: int

    def describe(self) -> str:
        h, w, b = self.shape
        return (
            f"latents after {self.steps} steps at {h}x{w}x{b} differ from the diffusers path by "
            f"{self.relative_error:.2e} (relative L2; tolerance {self.tolerance:.0e})"
        )


def self_check(
    candidate: LatentsPath,
    reference: Any,
    shape: WarmShape,
    *,
    steps: int = SELF_CHECK_STEPS,
    tolerance: float = SELF_CHECK_TOLERANCE,
) -> SelfCheck:
    """Run the same seeds through both paths and compare the denoised latents."""
    import torch

    h, w, batch = shape
    spec = GenerationSpec(h, w, steps, 7.5, "ddim", 0.0)
    tasks = [ImageTask(SELF_CHECK_PROMPT, "blurry, low quality", 1234 + i) for i in range(batch)]
    with torch.inference_mode():
        got = candidate.latents(spec, tasks)[1].float()
        want = reference.latents(spec, tasks, eager=True)[1].float()
    if not bool(torch.isfinite(got).all()):
        rel = math.inf
    else:
        rel = float((got - want).norm() / want.norm().clamp_min(1e-12))
    return SelfCheck(rel <= tolerance, rel, tolerance, shape, steps)


def one_shape_per_resolution(shapes: Sequence[WarmShape]) -> list[WarmShape]:
    """The first warm shape of each (height, width): the end-to-end check runs once per resolution."""
    seen: dict[tuple[int, int], WarmShape] = {}
    for h, w, b in shapes:
        seen.setdefault((h, w), (h, w, b))
    return list(seen.values())


# ------------------------------------------------------------------------------------------------
# Speed


def time_unet(backend: Any, shape: WarmShape) -> float | None:
    """Median seconds of one UNet call at ``shape`` through the backend's runner (graph or compiled)."""
    runner = getattr(backend, "runner", None)
    if runner is None:
        return None
    from sd_endpoint.backends.unet_runner import unet_inputs_for

    key = unet_inputs_for(runner.unet, *shape)
    return float(runner.time_call(key)) if runner.handles(key) else None


@dataclass(frozen=True)
class SpeedCheck:
    deepspeed_s: float
    diffusers_s: float
    shape: WarmShape

    @property
    def deepspeed_faster(self) -> bool:
        return self.deepspeed_s < self.diffusers_s * (1 - SPEED_MARGIN)

    def describe(self) -> str:
        h, w, b = self.shape
        return (
            f"UNet step at {h}x{w}x{b}: DeepSpeed {1000 * self.deepspeed_s:.1f} ms, "
            f"diffusers {1000 * self.diffusers_s:.1f} ms"
        )
