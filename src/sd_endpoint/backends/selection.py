"""Which backend serves, and why: ``SD_ENDPOINT_BACKEND=auto|diffusers|deepspeed``.

Rules:

* ``diffusers``: the diffusers path, always.
* ``auto``: the DeepSpeed path when the model is on CUDA in fp16, DeepSpeed is installed, there are warm
  shapes to capture, its kernels load and capture, the start-up self-check passes, and its UNet step at the
  first warm shape is faster than the diffusers path's (each as it would serve: graphs, compile); otherwise
  the diffusers path. The reason is logged and reported by ``describe()`` (``/ready``, ``sd_backend_info``).
  The speed test is there because on current PyTorch the answer depends on the GPU: on an H200 (torch
  2.11, CUDA 13) DeepSpeed's 2023 kernels were slower than SDPA with CUDA graphs (README, Performance).
* ``deepspeed``: the same, but any of those failing stops the start-up with a ModelLoadError naming the
  reason. An operator who asked for DeepSpeed explicitly gets it or a clear failure, never a quiet
  fallback to a slower path that would invalidate their capacity planning.

When the DeepSpeed path serves, ``RoutingBackend`` sends each batch to it only for the shapes it captured
(CUDA graphs are per shape) and everything else to the diffusers path.

The self-check runs the same seeds through both paths for a few steps at a captured shape and compares the
final latents: the relative L2 error must be finite and at most ``SELF_CHECK_TOLERANCE`` (0.05). Why 0.05:
two correct fp16 implementations differ only in rounding and summation order. Measured on this project's
CPU benchmark, the much coarser bf16 (8 mantissa bits against fp16's 11, so 8x the rounding error) moves
the full-size SD 2.1 UNet's latents by 3.3e-2 against fp32 after two steps (README, Performance); correct
fp16 kernels should therefore agree to a few 1e-3, an order of magnitude under the tolerance. The failures
the check exists for - fp16 attention overflow (inf/NaN, caught by the finiteness test), weights in the
wrong layout, a graph replaying stale buffers, a swapped GEGLU gate - change the latents by tens of percent
or more, an order of magnitude over it.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sd_endpoint.backends.base import Backend
from sd_endpoint.backends.diffusers_backend import DiffusersBackend, WarmShape, shape_label
from sd_endpoint.errors import ModelLoadError
from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask, StepCallback
from sd_endpoint.settings import Settings

log = logging.getLogger(__name__)

SELF_CHECK_TOLERANCE = 0.05
# auto takes the DeepSpeed path only when its UNet step is at least this much faster (timing noise is ~1%).
SPEED_MARGIN = 0.03
SELF_CHECK_STEPS = 3
SELF_CHECK_PROMPT = "a photograph of an astronaut riding a horse on the moon"


class FastBackend(Protocol):
    """What the router needs from the DeepSpeed path (a DiffusersBackend subclass; tests use fakes)."""

    name: str

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


DeepSpeedFactory = Callable[[DiffusersBackend, Sequence[WarmShape]], FastBackend]
# Seconds of one UNet call at a warm shape as the backend serves it, or None when it cannot be timed.
UNetTimer = Callable[[Any, WarmShape], "float | None"]


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def deepspeed_blocker(device: str, dtype: str, shapes: Sequence[WarmShape]) -> str | None:
    """Why the DeepSpeed path cannot even be tried here, or None. Cheap: imports nothing."""
    if not device.startswith("cuda"):
        return "no CUDA device (DeepSpeed's inference kernels are CUDA-only)"
    if dtype != "float16":
        return f"dtype {dtype}: DeepSpeed's kernel injection is fp16-only (SD_ENDPOINT_DTYPE)"
    if not shapes:
        return "SD_ENDPOINT_WARM_SHAPES is empty: the DeepSpeed path serves only shapes captured at start-up"
    if not deepspeed_installed():
        return "DeepSpeed is not installed (pip install 'sd-endpoint[gpu]')"
    from sd_endpoint.backends.deepspeed_attention import triton_blocker

    return triton_blocker()


# ------------------------------------------------------------------------------------------------
# Self-check


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
    candidate: FastBackend,
    reference: DiffusersBackend,
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


# ------------------------------------------------------------------------------------------------
# Routing


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
        sizes = self.fast.batch_sizes(spec)
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


# ------------------------------------------------------------------------------------------------
# Building


def _default_factory(base: DiffusersBackend, shapes: Sequence[WarmShape]) -> FastBackend:
    from sd_endpoint.backends.deepspeed_backend import DeepSpeedBackend

    return DeepSpeedBackend.create(base, shapes)


def build_backend(
    settings: Settings,
    pipe: Any,
    *,
    placement_reason: str = "",
    source: str = "",
    deepspeed_factory: DeepSpeedFactory | None = None,
    timer: UNetTimer | None = None,
) -> Backend:
    """Wrap a loaded pipeline in the backend the settings ask for (see the module docstring)."""
    shapes = list(settings.warm_shapes)
    base = DiffusersBackend(
        pipe,
        placement_reason=placement_reason,
        source=source,
        compile=settings.compile,
        cuda_graphs=settings.cuda_graphs,
    )
    requested = settings.backend
    device = str(base.device)
    dtype = str(base.dtype).replace("torch.", "")

    def serve_diffusers(reason: str) -> DiffusersBackend:
        base.selection_reason = reason
        if not base.warm_shapes:
            base.warm(shapes)
        log.info("Backend: diffusers (%s)", reason)
        return base

    if requested == "diffusers":
        return serve_diffusers("SD_ENDPOINT_BACKEND=diffusers")
    blocker = deepspeed_blocker(device, dtype, shapes)
    if blocker is not None:
        if requested == "deepspeed":
            raise ModelLoadError(f"SD_ENDPOINT_BACKEND=deepspeed: {blocker}.")
        return serve_diffusers(f"auto: DeepSpeed not used: {blocker}")

    factory = deepspeed_factory or _default_factory
    try:
        fast = factory(base, shapes)
        check = self_check(fast, base, shapes[0])
    except Exception as exc:  # noqa: BLE001 - kernels, JIT builds and capture fail in many ways
        reason = f"DeepSpeed path failed to start: {type(exc).__name__}: {exc}"
        if requested == "deepspeed":
            raise ModelLoadError(f"SD_ENDPOINT_BACKEND=deepspeed: {reason}") from exc
        log.warning("%s; serving the diffusers path", reason, exc_info=True)
        return serve_diffusers(f"auto: {reason}")
    if not check.passed:
        reason = f"DeepSpeed self-check failed: {check.describe()}"
        if requested == "deepspeed":
            raise ModelLoadError(f"SD_ENDPOINT_BACKEND=deepspeed: {reason}.")
        log.warning("%s; serving the diffusers path", reason)
        return serve_diffusers(f"auto: {reason}")
    speed = ""
    if requested == "auto":
        base.warm(shapes)  # the diffusers path as it would serve these shapes alone
        timed = timer or time_unet
        ds_s, base_s = timed(fast, shapes[0]), timed(base, shapes[0])
        if ds_s is not None and base_s is not None:
            check_speed = SpeedCheck(ds_s, base_s, shapes[0])
            speed = f"; {check_speed.describe()}"
            if not check_speed.deepspeed_faster:
                del fast
                reason = f"auto: DeepSpeed passed its self-check but is not faster ({check_speed.describe()})"
                return serve_diffusers(reason)
        base.release_warm()  # the DeepSpeed path serves the warm shapes; free the diffusers path's graphs
    origin = "SD_ENDPOINT_BACKEND=deepspeed" if requested == "deepspeed" else "auto"
    reason = f"{origin}: self-check passed ({check.describe()}){speed}; shapes {shape_label(shapes)}"
    base.selection_reason = "serves the shapes the DeepSpeed path did not capture"
    log.info("Backend: deepspeed (%s)", reason)
    return RoutingBackend(fast, base, reason)
