"""Which backend serves, and why: ``SD_ENDPOINT_BACKEND=auto|diffusers|deepspeed``.

Rules:

* ``diffusers``: the diffusers path, always.
* ``auto``: the DeepSpeed path only when the model is on CUDA in fp16, DeepSpeed is installed with its
  ``transformer_inference`` and ``spatial_inference`` ops already built (the GPU image builds them;
  ``auto`` never compiles them at start-up, which took 1-3 minutes per container start), Triton can still
  compile DeepSpeed's attention kernel, there are warm shapes, the injected blocks pass the per-layer check
  at every warm shape, the end-to-end check passes once per warm resolution, and its UNet step at the first
  warm shape is faster than the diffusers path's (each as it would serve: graphs, compile). Otherwise the
  diffusers path, and DeepSpeed's graphs and workspace are freed. The reason is logged and reported by
  ``describe()`` (``/ready``, ``sd_backend_info``). On an H200 (torch 2.11, CUDA 13) DeepSpeed's kernels
  were slower than SDPA with CUDA graphs (README, Performance), so on such GPUs ``auto`` serves diffusers.
* ``deepspeed``: the same (its ops may be built on first use here), but any of those failing stops the
  start-up with a ModelLoadError naming the reason: an operator who asked for DeepSpeed gets it or a clear
  failure, never a quiet fallback that would invalidate their capacity planning. It is not raced.

The checks are in checks.py, the routing of shapes between the two paths in routing.py.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sd_endpoint.backends import checks
from sd_endpoint.backends.base import Backend
from sd_endpoint.backends.diffusers_backend import DiffusersBackend, WarmShape, shape_label
from sd_endpoint.backends.routing import FastBackend, RoutingBackend
from sd_endpoint.errors import ModelLoadError
from sd_endpoint.settings import Settings

log = logging.getLogger(__name__)

DeepSpeedFactory = Callable[[DiffusersBackend, Sequence[WarmShape]], FastBackend]
# Seconds of one UNet call at a warm shape as the backend serves it, or None when it cannot be timed.
UNetTimer = Callable[[Any, WarmShape], "float | None"]
# The compiled ops the DeepSpeed path loads: (op name, folder of its pre-built module in the package).
DEEPSPEED_OPS = (("transformer_inference", "ops/transformer/inference"), ("spatial_inference", "ops/spatial"))


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def missing_deepspeed_ops() -> list[str]:
    """DeepSpeed ops neither pre-built into the package (DS_BUILD_*=1 at install) nor in torch's JIT
    extension cache; found by file name, without importing DeepSpeed (which picks an accelerator)."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return [name for name, _ in DEEPSPEED_OPS]
    package = Path(spec.submodule_search_locations[0])
    jit_root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    missing = []
    for name, folder in DEEPSPEED_OPS:
        installed = list((package / folder).glob(f"{name}_op*.so"))
        jit = list(jit_root.glob(f"{name}/{name}*.so")) + list(jit_root.glob(f"*/{name}/{name}*.so"))
        if not installed and not jit:
            missing.append(name)
    return missing


def deepspeed_blocker(
    device: str, dtype: str, shapes: Sequence[WarmShape], *, need_prebuilt: bool = False
) -> str | None:
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

    blocked = triton_blocker()
    if blocked is None and need_prebuilt:
        missing = missing_deepspeed_ops()
        if missing:
            blocked = (
                f"DeepSpeed's {' and '.join(missing)} ops are not pre-built (auto never compiles them at "
                "start-up; the GPU image builds them with DS_BUILD_TRANSFORMER_INFERENCE=1 "
                "DS_BUILD_SPATIAL_INFERENCE=1, or set SD_ENDPOINT_BACKEND=deepspeed)"
            )
    return blocked


def _default_factory(base: DiffusersBackend, shapes: Sequence[WarmShape]) -> FastBackend:
    from sd_endpoint.backends.deepspeed_backend import DeepSpeedBackend

    return DeepSpeedBackend.create(base, shapes)


class _Rejected(Exception):
    """The DeepSpeed path did not qualify: why, the path to release (once built) and the error behind it."""

    def __init__(self, reason: str, fast: FastBackend | None = None, cause: BaseException | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fast = fast
        self.cause = cause


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
    from sd_endpoint.backends.torch_setup import prepare

    shapes = list(settings.warm_shapes)
    prepared = prepare(settings, pipe, source=source)  # torch/cudnn/inductor, compile cache, precision
    base = DiffusersBackend(
        pipe,
        placement_reason=placement_reason,
        source=source,
        compile=prepared.compile,
        cuda_graphs=settings.cuda_graphs,
    )
    base.optimisations.extend(prepared.notes)
    requested = settings.backend
    if requested == "diffusers":
        return _serve_diffusers(base, shapes, "SD_ENDPOINT_BACKEND=diffusers")
    dtype = str(base.dtype).replace("torch.", "")
    blocker = deepspeed_blocker(str(base.device), dtype, shapes, need_prebuilt=requested == "auto")
    if blocker is not None:
        if requested == "deepspeed":
            raise ModelLoadError(f"SD_ENDPOINT_BACKEND=deepspeed: {blocker}.")
        return _serve_diffusers(base, shapes, f"auto: DeepSpeed not used: {blocker}")
    try:
        fast, passed = _qualify_deepspeed(
            base, shapes, race=requested == "auto", factory=deepspeed_factory or _default_factory, timer=timer
        )
    except _Rejected as rejected:
        if rejected.fast is not None:
            rejected.fast.release()  # its graphs and DeepSpeed's workspace (raw cudaMalloc, not torch's allocator)
        if requested == "deepspeed":
            raise ModelLoadError(f"SD_ENDPOINT_BACKEND=deepspeed: {rejected.reason}.") from rejected.cause
        log.warning("%s; serving the diffusers path", rejected.reason, exc_info=rejected.cause)
        return _serve_diffusers(base, shapes, f"auto: {rejected.reason}")
    origin = "SD_ENDPOINT_BACKEND=deepspeed" if requested == "deepspeed" else "auto"
    reason = f"{origin}: {passed}; shapes {shape_label(shapes)}"
    base.selection_reason = "serves the shapes the DeepSpeed path did not capture, and DeepCache requests"
    log.info("Backend: deepspeed (%s)", reason)
    return RoutingBackend(fast, base, reason)


def _serve_diffusers(base: DiffusersBackend, shapes: Sequence[WarmShape], reason: str) -> DiffusersBackend:
    base.selection_reason = reason
    if not base.warm_shapes:
        base.warm(shapes)
    log.info("Backend: diffusers (%s)", reason)
    return base


def _qualify_deepspeed(
    base: DiffusersBackend,
    shapes: Sequence[WarmShape],
    *,
    race: bool,
    factory: DeepSpeedFactory,
    timer: UNetTimer | None,
) -> tuple[FastBackend, str]:
    """Start the DeepSpeed path and run its checks (and, when ``race``, the speed race against ``base``);
    returns the path and what it passed, or raises _Rejected saying why not."""
    try:
        fast = factory(base, shapes)
    except Exception as exc:  # noqa: BLE001 - kernels, JIT builds and capture fail in many ways
        raise _Rejected(f"DeepSpeed path failed to start: {type(exc).__name__}: {exc}", cause=exc) from exc
    try:
        layers = checks.layer_check(base.raw_unet, fast.raw_unet, shapes)
        if not layers.passed:
            raise _Rejected(f"DeepSpeed per-layer check failed: {layers.describe()}", fast)
        ends = [checks.self_check(fast, base, shape) for shape in checks.one_shape_per_resolution(shapes)]
    except _Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - a check that cannot run is a failed check
        raise _Rejected(f"DeepSpeed checks failed to run: {type(exc).__name__}: {exc}", fast, exc) from exc
    failed = [c for c in ends if not c.passed]
    if failed:
        raise _Rejected(f"DeepSpeed self-check failed: {failed[0].describe()}", fast)
    passed = f"per-layer check passed ({layers.describe()}); end-to-end: " + "; ".join(c.describe() for c in ends)
    if not race:
        return fast, passed
    base.warm(shapes)  # the diffusers path as it would serve these shapes alone
    time_unet = timer or checks.time_unet
    ds_s, base_s = time_unet(fast, shapes[0]), time_unet(base, shapes[0])
    if ds_s is None or base_s is None:
        raise _Rejected("DeepSpeed passed its checks but its speed could not be measured", fast)
    speed = checks.SpeedCheck(ds_s, base_s, shapes[0])
    if not speed.deepspeed_faster:
        raise _Rejected(f"DeepSpeed passed its checks but is not faster ({speed.describe()})", fast)
    base.release_warm()  # the DeepSpeed path serves the warm shapes; free the diffusers path's graphs
    return fast, f"{passed}; {speed.describe()}"
