"""Our CPU path against diffusers' default (fp32) on this machine: full-size SD 2.1, random weights.

Both pipelines are loaded in this process from the same full-size folder (fp16 safetensors; built once by
``sd-endpoint demo-model --full-size`` or by this script) and run alternately, ``--repeats`` times each, so
that load from other processes hits both alike:

* baseline: ``StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)``, diffusers' default
  precision (named, because transformers 5 would otherwise keep the text encoder in the files' fp16), called
  as ``pipe(prompt, negative_prompt=..., height, width, num_inference_steps, generator)``;
* ours: ``create_backend`` as the service builds it (SD_ENDPOINT_DTYPE=auto: bf16 where the CPU has native
  bf16, channels-last), called through ``DiffusersBackend.latents`` and ``.decode``.

It prints the seconds per denoising step (first UNet call to the last step's end, over the steps; median of
the repeats), the VAE decode and end-to-end seconds, the ratios, and what the speed costs in accuracy: the
relative L2 error of ours against the fp32 latents for the same seed, and the mean absolute pixel
difference of the images (0-255). Wall time and process CPU time are both shown: on a shared machine the
CPU-time ratio is the steadier one.

    .venv/bin/python benchmarks/cpu_generation.py                 # 512x512, 2 steps, 2 repeats
    .venv/bin/python benchmarks/cpu_generation.py --ablation      # also plain bf16 without channels-last
    .venv/bin/python benchmarks/cpu_generation.py --compile       # also torch.compile (about 10 minutes more)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _common import DEFAULT_CACHE, full_size_model, machine, print_machine, table

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
NEGATIVE = "blurry, low quality"
SEED = 1234


class StepClock:
    """Times the denoising loop: from the UNet's first call to the last step's end."""

    def __init__(self, unet: Any) -> None:
        self.first: float | None = None
        self.last = 0.0
        self.first_cpu = 0.0
        self.last_cpu = 0.0
        self.handle = unet.register_forward_pre_hook(self._pre)

    def _pre(self, *_: Any) -> None:
        if self.first is None:
            self.first, self.first_cpu = time.perf_counter(), time.process_time()

    def step_end(self) -> None:
        self.last, self.last_cpu = time.perf_counter(), time.process_time()

    def reset(self) -> None:
        self.first = None

    def per_step(self, steps: int) -> tuple[float, float]:
        assert self.first is not None
        return (self.last - self.first) / steps, (self.last_cpu - self.first_cpu) / steps


def run_baseline(pipe: Any, clock: StepClock, size: int, steps: int) -> dict[str, Any]:
    import torch

    clock.reset()
    started, cpu = time.perf_counter(), time.process_time()

    def on_step(_p: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        clock.step_end()
        return kwargs

    with torch.inference_mode():
        latents = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            height=size,
            width=size,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(SEED),
            output_type="latent",
            callback_on_step_end=on_step,
        ).images
        t_vae = time.perf_counter()
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        image = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
    wall, cpu_s = clock.per_step(steps)
    return {
        "step": wall,
        "step_cpu": cpu_s,
        "vae": time.perf_counter() - t_vae,
        "total": time.perf_counter() - started,
        "total_cpu": time.process_time() - cpu,
        "latents": latents.float(),
        "image": image,
    }


def run_ours(backend: Any, clock: StepClock, size: int, steps: int) -> dict[str, Any]:
    import torch

    from sd_endpoint.jobs import GenerationSpec, ImageTask

    clock.reset()
    spec = GenerationSpec(size, size, steps, 7.5, "ddim", 0.0)
    started, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        pipe, latents, generators, _ = backend.latents(
            spec, [ImageTask(PROMPT, NEGATIVE, SEED)], on_step=lambda i, n: clock.step_end()
        )
        t_vae = time.perf_counter()
        images, _notes = backend.decode(pipe, latents, generators)
    wall, cpu_s = clock.per_step(steps)
    return {
        "step": wall,
        "step_cpu": cpu_s,
        "vae": time.perf_counter() - t_vae,
        "total": time.perf_counter() - started,
        "total_cpu": time.process_time() - cpu,
        "latents": latents.float(),
        "image": images[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, help="Full-size diffusers folder (default: built into the cache).")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ablation", action="store_true", help="Also time plain bf16 (no channels-last).")
    parser.add_argument(
        "--compile", action="store_true", help="Also time ours + torch.compile (compiling takes minutes here)."
    )
    parser.add_argument("--json", type=Path, help="Write the numbers here too.")
    args = parser.parse_args()

    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from sd_endpoint.backends import create_backend
    from sd_endpoint.backends.diffusers_backend import DiffusersBackend
    from sd_endpoint.model.discovery import ModelSource
    from sd_endpoint.model.loading import load_pipeline
    from sd_endpoint.model.placement import Placement
    from sd_endpoint.settings import load_settings

    folder = full_size_model(args.model, args.cache_dir)
    info = machine()
    print_machine(info)
    print(
        f"Model: {folder} (full-size SD 2.1 architecture, random weights); {args.size}x{args.size}, "
        f"{args.steps} DDIM steps, guidance 7.5, {args.repeats} alternating repeats",
        flush=True,
    )

    # fp32 explicitly: transformers 5 would keep the text encoder in the files' fp16 ("auto" dtype).
    baseline = StableDiffusionPipeline.from_pretrained(
        str(folder),
        torch_dtype=torch.float32,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    baseline.set_progress_bar_config(disable=True)
    assert baseline.unet.dtype == torch.float32  # diffusers' default
    ours = create_backend(load_settings(model=str(folder), cache_dir=args.cache_dir, warmup=False))
    assert isinstance(ours, DiffusersBackend)
    print(
        f"Ours: {ours.describe()['dtype']} on {ours.describe()['device']} "
        f"({ours.placement_reason}); optimisations: {ours.describe()['optimisations']}",
        flush=True,
    )
    compiled: Any = None
    if args.compile:
        from sd_endpoint.backends.deepspeed_backend import shared_copy

        # Another pipeline over ours' weights (no extra memory) with its own UNet module objects, so that the
        # step clock's hook on ours' UNet stays out of the compiled graph.
        components = {k: v for k, v in ours.pipe.components.items() if k not in ("safety_checker", "feature_extractor")}
        components["unet"] = shared_copy(ours.raw_unet)
        shared = StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        compiled = DiffusersBackend(shared, compile=True)
        t0 = time.perf_counter()
        compiled.warm([(args.size, args.size, 1)])
        print(f"torch.compile warm-up (one shape): {time.perf_counter() - t0:.0f} s", flush=True)
        if compiled.runner is None:
            raise SystemExit(f"torch.compile failed: {compiled.describe()['optimisations']}")
    runs: dict[str, tuple[Any, Any, Any]] = {
        "diffusers default (fp32)": (run_baseline, baseline, StepClock(baseline.unet)),
        "ours": (run_ours, ours, StepClock(ours.raw_unet)),
    }
    if args.ablation:
        plain = DiffusersBackend(
            load_pipeline(
                ModelSource("diffusers", str(folder), "bench"), Placement("cpu", "bfloat16", "bench"), args.cache_dir
            ),
            optimise=False,
        )
        runs["plain bf16 (ablation)"] = (run_ours, plain, StepClock(plain.raw_unet))

    if compiled is not None:
        runs["ours + torch.compile"] = (run_ours, compiled, StepClock(compiled.runner))

    results: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for r in range(args.repeats):
        for name, (fn, engine, clock) in runs.items():
            out = fn(engine, clock, args.size, args.steps)
            results[name].append(out)
            print(f"  repeat {r + 1} {name}: {out['step']:.2f} s/step, total {out['total']:.1f} s", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(o[key] for o in results[name])

    base_name = "diffusers default (fp32)"
    ref_lat = results[base_name][0]["latents"]
    ref_img = np.asarray(results[base_name][0]["image"], dtype=float)
    rows = []
    summary: dict[str, Any] = {"machine": info, "size": args.size, "steps": args.steps, "rows": {}}
    for name in runs:
        lat = results[name][0]["latents"]
        rel = float((lat - ref_lat).norm() / ref_lat.norm())
        pix = float(np.abs(np.asarray(results[name][0]["image"], dtype=float) - ref_img).mean())
        row = {
            "s_per_step": med(name, "step"),
            "cpu_s_per_step": med(name, "step_cpu"),
            "vae_s": med(name, "vae"),
            "total_s": med(name, "total"),
            "speedup_step": med(base_name, "step") / med(name, "step"),
            "speedup_step_cpu": med(base_name, "step_cpu") / med(name, "step_cpu"),
            "speedup_total": med(base_name, "total") / med(name, "total"),
            "latent_rel_err": rel,
            "pixel_mae": pix,
        }
        summary["rows"][name] = row
        rows.append(
            [
                name,
                row["s_per_step"],
                row["cpu_s_per_step"],
                row["vae_s"],
                row["total_s"],
                f"{row['speedup_step']:.2f}x",
                f"{row['speedup_step_cpu']:.2f}x",
                f"{row['speedup_total']:.2f}x",
                f"{rel:.2e}",
                f"{pix:.2f}",
            ]
        )
    print()
    print(
        table(
            [
                "path",
                "s/step (wall)",
                "CPU s/step",
                "VAE decode s",
                "end-to-end s",
                "step speed-up",
                "step speed-up (CPU time)",
                "end-to-end speed-up",
                "latent rel. error",
                "pixel MAE (0-255)",
            ],
            rows,
        )
    )
    speed = summary["rows"]["ours"]["speedup_step"]
    print(
        f"\nOurs vs diffusers' fp32 default, same run: {speed:.2f}x per denoising step (wall), "
        f"{summary['rows']['ours']['speedup_step_cpu']:.2f}x (CPU time); target 3x: "
        f"{'met' if speed >= 3 else 'not met'}."
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
