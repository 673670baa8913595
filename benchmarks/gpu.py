"""GPU throughput of each backend at 768x768: DDIM 50 and DPM-Solver++ 25, batch 1 and 4.

Configurations, each loaded fresh (fast loader, fp16) and measured after its own warm-up, in the order
given by ``--configs`` (default: the issue's targets first, so that a run cut short by ``--budget-s``
still has them):

* ``plain``: StableDiffusionPipeline as from_pretrained gives it (SDPA), eager: the baseline;
* ``default``: what the service builds with default settings (backends.selection.build_backend:
  SD_ENDPOINT_BACKEND=auto, SD_ENDPOINT_COMPILE=auto - a compiled UNet under a CUDA graph per warm shape,
  fused QKV, cuDNN autotune), warm shapes = the measured batches, into an empty compile cache: its
  start-up time is a first start's;
* ``deepcache``: ``cache_interval`` 3 per request (DeepCache; eager UNet), served by the default's backend
  when it follows ``default`` (a request parameter needs no second build);
* ``startup``: time to ready of the default in fresh processes: a warm restart from the cache the
  ``default`` configuration filled and an uncompiled start (the target compares these two), then, after
  every other configuration and time allowing, a first start with an empty cache;
* ``fp8``: the default plus SD_ENDPOINT_PRECISION=fp8 (or the reason it was refused);
* ``deepspeed``: SD_ENDPOINT_BACKEND=deepspeed (DeepSpeed kernels, graphs, per-layer and end-to-end
  checks), or the reason it could not start; its peak memory includes DeepSpeed's workspace (a raw
  cudaMalloc that torch's statistics do not see);
* optional: ``diffusers`` (ours without compile), ``nofuse`` (no fused QKV), ``nographs`` (no CUDA graphs).

For every cell: seconds per image, images per hour, the fraction of the FLOP floor (4.30 TFLOP per step for
the two UNet rows of one image plus 5.75 TFLOP for its VAE decode, at the GPU's dense fp16 peak), the peak
GPU memory of that configuration, and the difference of the seed's image from an fp32 diffusers reference
(TF32 off), as mean and max absolute pixel difference (0-255), and from the plain fp16 configuration's image
(same precision: what our changes alone do; with random weights fp16 and fp32 drift far apart). The run is
bounded by ``--budget-s``: cells not started in time are listed as skipped. It builds the full-size random
model when ``--model`` is not given.

    python benchmarks/gpu.py --model /tmp/sd21-full            # on a GPU machine (see benchmarks/gpu_check.sh)
    python benchmarks/gpu.py --dry-run                          # CPU, tiny model: checks the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import DEFAULT_CACHE, full_size_model, machine, print_machine, table

UNET_TFLOP_PER_STEP = 4.30  # one image: conditional + unconditional rows at 768x768 (96x96 latents)
VAE_TFLOP = 5.75  # decode of one 768x768 image
PEAKS_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0}
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
NEGATIVE = "blurry, low quality"
SEED = 1234


@dataclass
class Cell:
    config: str
    scheduler: str
    steps: int
    batch: int
    s_per_image: float | None = None
    floor_fraction: float | None = None
    peak_gib: float | None = None  # torch's peak allocation plus DeepSpeed's workspace
    pixel_mae: float | None = None
    pixel_max: float | None = None
    pixel_mae_plain: float | None = None
    note: str = ""


@dataclass
class Config:
    name: str
    startup_s: float = 0.0
    note: str = ""
    cells: list[Cell] = field(default_factory=list)


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAKS_TFLOPS.items():  # most specific first
        if key in name:
            return value
    return None


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load(folder: Path, device: str, dtype: str, cache_dir: Path) -> Any:
    from sd_endpoint.model.discovery import ModelSource
    from sd_endpoint.model.loading import load_pipeline
    from sd_endpoint.model.placement import Placement

    return load_pipeline(ModelSource("diffusers", str(folder), "bench"), Placement(device, dtype, "bench"), cache_dir)


def reference_images(args: argparse.Namespace, folder: Path, schedulers: list[tuple[str, int]]) -> dict[str, Any]:
    """The seed's image from plain diffusers in fp32 (TF32 off), per scheduler."""
    import numpy as np
    import torch

    from sd_endpoint.backends.diffusers_backend import DiffusersBackend
    from sd_endpoint.jobs import GenerationSpec, ImageTask

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    backend = DiffusersBackend(load(folder, args.device, "float32", args.cache_dir), optimise=False, cuda_graphs=False)
    out = {}
    for name, steps in schedulers:
        spec = GenerationSpec(args.size, args.size, steps, 7.5, name, 0.0)  # type: ignore[arg-type]
        out[name] = np.asarray(backend.generate(spec, [ImageTask(PROMPT, NEGATIVE, SEED)]).images[0], dtype=float)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    del backend
    free(args.device)
    return out


def drop(backend: Any, device: str) -> None:
    """Free what a configuration's backend holds on the GPU (the caller drops its own reference)."""
    if hasattr(backend, "fast"):
        backend.fast.release()  # DeepSpeed's workspace is not torch's to free
    free(device)


def free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def settings_for(args: argparse.Namespace, folder: Path, batches: list[int], **overrides: Any) -> Any:
    from sd_endpoint.settings import load_settings

    shapes = ",".join(f"{args.size}x{args.size}x{b}" for b in batches)
    values: dict[str, Any] = {
        "model": str(folder),
        "device": args.device,
        "dtype": args.dtype,
        "cache_dir": args.cache_dir,
        "warm_shapes": shapes,
        **overrides,
    }
    return load_settings(**values)


def build(key: str, args: argparse.Namespace, folder: Path, batches: list[int], compile_cache: Path) -> Any:
    """The backend for one configuration; raises with the reason when it cannot start. A compiled
    configuration fills ``compile_cache`` (empty: its start-up time is a first start's)."""
    from sd_endpoint.backends.diffusers_backend import DiffusersBackend
    from sd_endpoint.backends.selection import build_backend
    from sd_endpoint.model.discovery import resolve_source

    pipe = load(folder, args.device, args.dtype, args.cache_dir)
    shapes = [(args.size, args.size, b) for b in batches]
    if key == "plain":
        return DiffusersBackend(pipe, optimise=False, cuda_graphs=False)
    if key in ("default", "fp8", "deepcache"):
        precision = "fp8" if key == "fp8" else "fp16"
        settings = settings_for(args, folder, batches, precision=precision, compile_cache=compile_cache)
        # Keyed as a server process keys it: the warm-restart probe must find this cache warm.
        return build_backend(settings, pipe, source=resolve_source(settings).label)
    if key == "deepspeed":
        return build_backend(settings_for(args, folder, batches, backend="deepspeed", compile="off"), pipe)
    if key == "diffusers":
        return build_backend(settings_for(args, folder, batches, backend="diffusers", compile="off"), pipe)
    backend = DiffusersBackend(pipe, fuse_qkv=key != "nofuse", cuda_graphs=key != "nographs")
    backend.warm(shapes)
    return backend


def workspace_gib(backend: Any) -> float:
    """DeepSpeed's workspace, which torch.cuda.max_memory_allocated cannot see."""
    fast = getattr(backend, "fast", None)
    return float(getattr(fast, "workspace_bytes", 0)) / 2**30


def startup_probe() -> int:
    """In a fresh process: load and build the default backend; print the seconds to ready as JSON."""
    started = time.perf_counter()
    from sd_endpoint.backends import create_backend
    from sd_endpoint.settings import load_settings

    backend = create_backend(load_settings())
    print(json.dumps({"ready_s": time.perf_counter() - started, "optimisations": backend.describe()["optimisations"]}))
    return 0


def start_skipped(left_s: float, compiles: bool, compile_s: float | None) -> str | None:
    """Why a configuration is not started with ``left_s`` of the budget left, or None. One that compiles
    needs about what the default took to start: begun with less left, the outer timeout would cut it off
    and take the time of the cheaper configurations after it (DeepSpeed does not compile)."""
    if left_s <= 0:
        return "skipped: time budget"
    if compiles and compile_s is not None and left_s < compile_s:
        return f"skipped: {left_s:.0f} s of the budget left; the default took {compile_s:.0f} s to compile and start"
    return None


def started_in(configs: list[Config], name: str) -> float | None:
    """How long the named configuration took to start (load and compile), if it ran."""
    return next((c.startup_s for c in configs if c.name == name and c.cells), None)


def fresh_compile_cache() -> Path:
    return Path(tempfile.mkdtemp(prefix="gpu-bench-compile-"))


def startups(
    args: argparse.Namespace, folder: Path, batches: list[int], deadline: float, runs: list[tuple[str, dict[str, str]]]
) -> dict[str, Any]:
    """Time to ready of the default configuration in fresh processes, one per (name, extra environment)."""
    shapes = ",".join(f"{args.size}x{args.size}x{b}" for b in batches)
    base = {
        **os.environ,
        "SD_ENDPOINT_MODEL": str(folder),
        "SD_ENDPOINT_DEVICE": args.device,
        "SD_ENDPOINT_DTYPE": args.dtype,
        "SD_ENDPOINT_CACHE_DIR": str(args.cache_dir),
        "SD_ENDPOINT_WARM_SHAPES": shapes,
    }
    out: dict[str, Any] = {}
    for name, env in runs:
        left = deadline - time.perf_counter()
        if left < 10:
            out[name] = {"error": "skipped: time budget"}
            continue
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--startup-probe"],
                env={**base, **env},
                capture_output=True,
                text=True,
                timeout=left,
            )
        except subprocess.TimeoutExpired:
            out[name] = {"error": f"not ready within the {left:.0f} s left"}
            continue
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        out[name] = json.loads(lines[-1]) if done.returncode == 0 and lines else {"error": done.stderr[-500:]}
        said = str(out[name].get("optimisations", ""))
        if name == "warm restart" and "compile cache" in said and "(warm)" not in said:
            out[name]["warning"] = "the compile cache was not warm: this number is not a warm restart's"
        print(f"startup: {name}: {out[name]}", flush=True)
    return out


def measure(
    backend: Any,
    args: argparse.Namespace,
    name: str,
    steps: int,
    batch: int,
    ref: Any,
    cell: Cell,
    peak: float | None,
    cache_interval: int = 1,
) -> Any:
    """Time one cell; returns the seed's image (as an array)."""
    import numpy as np
    import torch

    from sd_endpoint.jobs import GenerationSpec, ImageTask

    spec = GenerationSpec(args.size, args.size, steps, 7.5, name, 0.0, cache_interval=cache_interval)  # type: ignore[arg-type]
    tasks = [ImageTask(PROMPT, NEGATIVE, SEED + i) for i in range(batch)]
    warm = GenerationSpec(args.size, args.size, 2, 7.5, name, 0.0, cache_interval=cache_interval)  # type: ignore[arg-type]
    backend.generate(warm, tasks)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(args.device)
    started = time.perf_counter()
    result = backend.generate(spec, tasks)
    sync(args.device)
    seconds = time.perf_counter() - started
    cell.s_per_image = seconds / batch
    if peak and args.size == 768:
        floor = batch * (steps * UNET_TFLOP_PER_STEP + VAE_TFLOP) / peak
        cell.floor_fraction = floor / seconds
    if args.device.startswith("cuda"):
        cell.peak_gib = torch.cuda.max_memory_allocated() / 2**30 + workspace_gib(backend)
    image = np.asarray(result.images[0], dtype=float)
    diff = np.abs(image - ref)
    cell.pixel_mae, cell.pixel_max = float(diff.mean()), float(diff.max())
    if any(result.notes):
        cell.note = "; ".join(sorted({n for notes in result.notes for n in notes}))
    return image


def report(
    configs: list[Config], args: argparse.Namespace, info: dict[str, Any], starts: dict[str, Any] | None = None
) -> None:
    """Print (and save) everything measured so far: called after each configuration, so a run cut short
    still leaves its table."""
    rows = []
    base = {(c.scheduler, c.batch): c.s_per_image for c in configs[0].cells} if configs and configs[0].cells else {}
    for config in configs:
        if not config.cells:
            rows.append([config.name, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", config.note])
        for c in config.cells:
            if c.s_per_image is None:
                rows.append(
                    [config.name, f"{c.scheduler} {c.steps}", c.batch, "-", "-", "-", "-", "-", "-", "-", "-", c.note]
                )
                continue
            ratio = base.get((c.scheduler, c.batch))
            rows.append(
                [
                    config.name,
                    f"{c.scheduler} {c.steps}",
                    c.batch,
                    c.s_per_image,
                    f"{3600 / c.s_per_image:.0f}",
                    f"{ratio / c.s_per_image:.2f}x" if ratio else "-",
                    f"{100 * c.floor_fraction:.0f}%" if c.floor_fraction is not None else "n/a",
                    f"{c.peak_gib:.1f}" if c.peak_gib is not None else "n/a",
                    f"{c.pixel_mae:.2f}",
                    f"{c.pixel_max:.0f}",
                    f"{c.pixel_mae_plain:.2f}" if c.pixel_mae_plain is not None else "-",
                    c.note,
                ]
            )
    print()
    print(
        table(
            [
                "configuration",
                "scheduler",
                "batch",
                "s/image",
                "images/hour",
                "vs plain fp16",
                "of FLOP floor",
                "peak GPU GiB (incl. DS workspace)",
                "pixel MAE vs fp32",
                "pixel max",
                "pixel MAE vs plain fp16",
                "note",
            ],
            rows,
        )
    )
    print(
        "\nStart-up per configuration (load + warm-up/capture/compile): "
        + "; ".join(f"{c.name} {c.startup_s:.1f} s" + (f" ({c.note})" if c.note else "") for c in configs)
    )
    if starts:
        print("Time to ready in a fresh process: " + "; ".join(f"{k} {v.get('ready_s', v)}" for k, v in starts.items()))
    if args.json:
        cells = [c.__dict__ | {"cells": [x.__dict__ for x in c.cells]} for c in configs]
        payload = {"machine": info, "configs": cells, "startup": starts or {}}
        args.json.write_text(json.dumps(payload, indent=2, default=str))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, help="Full-size diffusers folder (default: built into the cache).")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--dpm-steps", type=int, default=25)
    parser.add_argument(
        "--configs",
        default="plain,default,deepcache,startup,fp8,deepspeed",
        help="In this order, so that a run cut short by --budget-s still has the targets' numbers.",
    )
    parser.add_argument("--cache-interval", type=int, default=3, help="DeepCache interval of the deepcache config.")
    parser.add_argument("--peak-tflops", type=float, help="Dense fp16 peak, if the GPU is not in the table.")
    parser.add_argument("--budget-s", type=float, default=330.0, help="No new cell starts after this.")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 64x64, 2 steps: checks the script.")
    parser.add_argument("--startup-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.startup_probe:
        return startup_probe()
    started = time.perf_counter()

    import torch

    if args.dry_run:
        from sd_endpoint.model.demo import write_demo_model

        tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-dry-"))
        folder = write_demo_model(tmp / "tiny", cache_dir=args.cache_dir)
        args.device, args.dtype, args.size = "cpu", "float32", 64
        args.ddim_steps = args.dpm_steps = 2
        args.batches = "1"
        args.budget_s = max(args.budget_s, 3600.0)  # the dry run checks every part; its caller bounds the time
    else:
        if not torch.cuda.is_available():
            raise SystemExit("No CUDA device: run with --dry-run to check the script on a CPU.")
        folder = full_size_model(args.model, args.cache_dir)
        args.device, args.dtype = "cuda", "float16"
    batches = [int(b) for b in args.batches.split(",")]
    schedulers = [("ddim", args.ddim_steps), ("dpm_solver_multistep", args.dpm_steps)]
    info = machine()
    print_machine(info)
    peak = peak_tflops(info["gpu"], args.peak_tflops) if args.device == "cuda" else None
    print(
        f"Model: {folder}; {args.size}x{args.size}, guidance 7.5, batches {batches}; dense fp16 peak "
        f"{peak or 'unknown'} TFLOP/s; budget {args.budget_s:.0f} s",
        flush=True,
    )

    refs = reference_images(args, folder, schedulers)
    print(f"fp32 references done at {time.perf_counter() - started:.0f} s", flush=True)

    names = {
        "plain": "diffusers fp16 (plain)",
        "default": "ours: default",
        "fp8": "ours: default + fp8",
        "deepcache": f"ours: default + DeepCache {args.cache_interval}",
        "deepspeed": "ours: deepspeed",
        "diffusers": "ours: diffusers, no compile",
        "nofuse": "ours: diffusers, no fused QKV (ablation)",
        "nographs": "ours: diffusers, no CUDA graphs (ablation)",
    }
    keys = args.configs.split(",")
    unknown = [k for k in keys if k not in names and k != "startup"]
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {', '.join([*names, 'startup'])}")
    deadline = started + args.budget_s + 40  # a start-up probe begun within the budget may finish after it
    configs: list[Config] = []
    plain_images: dict[tuple[str, int], Any] = {}
    starts: dict[str, Any] = {}
    filled: Path | None = None  # the compile cache the default configuration filled, for the warm restart
    kept: tuple[Config, Any] | None = None  # the default's backend, when the DeepCache cells follow it
    for position, key in enumerate(keys):
        if key == "startup":
            # The targets' start-up numbers first: a warm restart from the default's filled cache against an
            # uncompiled start. The first start in a fresh process (empty cache) comes last, time allowing.
            if time.perf_counter() - started > args.budget_s:
                starts.update({"warm restart": {"error": "skipped: time budget"}})
                continue
            runs: list[tuple[str, dict[str, str]]] = []
            if filled is None:  # no default configuration filled a cache: a first start fills one
                filled = fresh_compile_cache()
                runs.append(("first start", {"SD_ENDPOINT_COMPILE_CACHE": str(filled)}))
            runs += [
                ("warm restart", {"SD_ENDPOINT_COMPILE_CACHE": str(filled)}),
                ("uncompiled start", {"SD_ENDPOINT_COMPILE": "off"}),
            ]
            starts.update(startups(args, folder, batches, deadline, runs))
            continue
        config = Config(names[key])
        configs.append(config)
        compiles = key == "fp8" or (key == "deepcache" and kept is None)
        compile_s = started_in(configs, names["default"])
        skipped = start_skipped(args.budget_s - (time.perf_counter() - started), compiles, compile_s)
        if skipped:
            config.note = skipped
            if kept is not None:  # the default's backend waited for these cells: free it now
                drop(kept[1], args.device)
                kept = backend = None
            continue
        if key == "deepcache" and kept is not None:
            # DeepCache is a request parameter: the default's backend serves it, no second build or compile.
            default_config, backend = kept
            config.startup_s, config.note = (
                default_config.startup_s,
                "the default's backend, cache_interval per request",
            )
        else:
            t0 = time.perf_counter()
            cache = fresh_compile_cache()
            try:
                backend = build(key, args, folder, batches, cache)
            except Exception as exc:  # noqa: BLE001 - report why a configuration could not start, keep going
                config.note = f"could not start: {type(exc).__name__}: {str(exc)[:300]}"
                print(f"{config.name}: {config.note}", flush=True)
                free(args.device)
                continue
            config.startup_s = time.perf_counter() - t0
            info_b = backend.describe()
            config.note = (
                f"{info_b.get('backend')}: {info_b.get('backend_reason', '')}; {info_b.get('optimisations', '')}"
            )
            if key == "default":
                filled = cache
        print(f"{config.name}: ready in {config.startup_s:.1f} s {config.note}", flush=True)
        interval = args.cache_interval if key == "deepcache" else 1
        for sched, steps in schedulers:
            for batch in batches:
                cell = Cell(config.name, sched, steps, batch)
                config.cells.append(cell)
                if time.perf_counter() - started > args.budget_s:
                    cell.note = "skipped: time budget"
                    continue
                image = measure(backend, args, sched, steps, batch, refs[sched], cell, peak, interval)
                if key == "plain":
                    plain_images[(sched, batch)] = image
                elif (sched, batch) in plain_images:  # same precision: shows what our changes alone do
                    cell.pixel_mae_plain = float(abs(image - plain_images[(sched, batch)]).mean())
                print(f"  {sched} {steps} steps, batch {batch}: {cell.s_per_image:.3f} s/image", flush=True)
        kept = (config, backend) if key == "default" and keys[position + 1 : position + 2] == ["deepcache"] else None
        if kept is None:
            drop(backend, args.device)
            backend = None
        report(configs, args, info)
    if "startup" in keys and "first start" not in starts:
        compile_s = started_in(configs, names["default"])
        why = start_skipped(args.budget_s - (time.perf_counter() - started), True, compile_s)
        first = [("first start", {"SD_ENDPOINT_COMPILE_CACHE": str(fresh_compile_cache())})]
        starts.update({"first start": {"error": why}} if why else startups(args, folder, batches, deadline, first))

    report(configs, args, info, starts)
    print(f"Total {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
