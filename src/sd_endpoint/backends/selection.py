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
    device = str(base.device)
    dtype = str(base.dtype).replace("torch.", "")

    def serve_diffusers(reason: str) -> DiffusersBackend:
        base.selection_reason = reason
        if not base.warm_shapes:
            base.warm(shapes)
        log.info("Backend: diffusers (%s)", reason)
        return base

    def refuse_or_fall_back(reason: str, fast: FastBackend | None = None, exc: BaseException | None = None) -> Backend:
        if fast is not None:
            fast.release()  # its graphs and DeepSpeed's workspace (raw cudaMalloc, not torch's allocator)
        if requested == "deepspeed":
            raise ModelLoadError(f"SD_ENDPOINT_BACKEND=deepspeed: {reason}.") from exc
        log.warning("%s; serving the diffusers path", reason, exc_info=exc is not None)
        return serve_diffusers(f"auto: {reason}")

    if requested == "diffusers":
        return serve_diffusers("SD_ENDPOINT_BACKEND=diffusers")
    blocker = deepspeed_blocker(device, dtype, shapes, need_prebuilt=requested == "auto")
    if blocker is not None:
        if requested == "deepspeed":
            raise ModelLoadError(f"SD_ENDPOINT_BACKEND=deepspeed: {blocker}.")
        return serve_diffusers(f"auto: DeepSpeed not used: {blocker}")

    factory = deepspeed_factory or _default_factory
    try:
        fast = factory(base, shapes)
    except Exception as exc:  # noqa: BLE001 - kernels, JIT builds and capture fail in many ways
        return refuse_or_fall_back(f"DeepSpeed path failed to start: {type(exc).__name__}: {exc}", exc=exc)
    try:
        layers = checks.layer_check(base.raw_unet, fast.raw_unet, shapes)
        if not layers.passed:
            return refuse_or_fall_back(f"DeepSpeed per-layer check failed: {layers.describe()}", fast)
        ends = [checks.self_check(fast, base, shape) for shape in checks.one_shape_per_resolution(shapes)]
    except Exception as exc:  # noqa: BLE001 - a check that cannot run is a failed check
        return refuse_or_fall_back(f"DeepSpeed checks failed to run: {type(exc).__name__}: {exc}", fast, exc)
    failed = [c for c in ends if not c.passed]
    if failed:
        return refuse_or_fall_back(f"DeepSpeed self-check failed: {failed[0].describe()}", fast)
    passed = f"per-layer check passed ({layers.describe()}); end-to-end: " + "; ".join(c.describe() for c in ends)
    speed = ""
    if requested == "auto":
        base.warm(shapes)  # the diffusers path as it would serve these shapes alone
        timed = timer or checks.time_unet
        ds_s, base_s = timed(fast, shapes[0]), timed(base, shapes[0])
        if ds_s is None or base_s is None:
            return refuse_or_fall_back("DeepSpeed passed its checks but its speed could not be measured", fast)
        check_speed = checks.SpeedCheck(ds_s, base_s, shapes[0])
        speed = f"; {check_speed.describe()}"
        if not check_speed.deepspeed_faster:
            return refuse_or_fall_back(
                f"DeepSpeed passed its checks but is not faster ({check_speed.describe()})", fast
            )
        base.release_warm()  # the DeepSpeed path serves the warm shapes; free the diffusers path's graphs
    origin = "SD_ENDPOINT_BACKEND=deepspeed" if requested == "deepspeed" else "auto"
    reason = f"{origin}: {passed}{speed}; shapes {shape_label(shapes)}"
    base.selection_reason = "serves the shapes the DeepSpeed path did not capture, and DeepCache requests"
    log.info("Backend: deepspeed (%s)", reason)
    return RoutingBackend(fast, base, reason)
