"""DeepCache on the CPU: speed-up and image difference against the same seeds without caching, in one run.

For each ``cache_interval`` (1 = off, the baseline), the service's diffusers backend generates the same seeds
with the same prompt; runs alternate between intervals (``--repeats`` rounds) so machine load hits all alike.
Reported per interval: median seconds per image, the speed-up against interval 1 from this run, the number of
full UNet passes, and the mean / max absolute pixel difference (0-255) from the uncached image of the same seed.
With random weights (the default full-size model) the images are noise, so the pixel difference measures how
far the computation moved, not how much a viewer would notice.

    .venv/bin/python benchmarks/deepcache.py                         # full-size SD 2.1 (built once), 256x256
    .venv/bin/python benchmarks/deepcache.py --model DIR --size 512 --steps 25 --intervals 1,2,3,5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from _common import DEFAULT_CACHE, full_size_model, machine, print_machine, table

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed"
NEGATIVE = "blurry, low quality"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, help="Diffusers folder (default: the full-size random model).")
    parser.add_argument("--tiny", action="store_true", help="The tiny demo model (checks the script only).")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--intervals", default="1,2,3")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 where the CPU has it, else fp32.")
    args = parser.parse_args()

    import numpy as np
    import torch

    from sd_endpoint.backends.selection import build_backend
    from sd_endpoint.jobs import GenerationSpec, ImageTask
    from sd_endpoint.model.discovery import ModelSource
    from sd_endpoint.model.loading import load_pipeline
    from sd_endpoint.model.placement import choose_placement
    from sd_endpoint.settings import load_settings

    if args.tiny:
        from sd_endpoint.model.demo import write_demo_model

        folder = write_demo_model(args.cache_dir / "deepcache-tiny", cache_dir=args.cache_dir)
    else:
        folder = full_size_model(args.model, args.cache_dir)
    settings = load_settings(
        model=str(folder), device="cpu", dtype=args.dtype, cache_dir=args.cache_dir, backend="diffusers", warm_shapes=""
    )
    placement = choose_placement(settings)
    pipe = load_pipeline(ModelSource("diffusers", str(folder), "bench"), placement, args.cache_dir)
    backend = build_backend(settings, pipe)
    info = machine()
    print_machine(info)
    print(
        f"Model {folder} ({placement.dtype_name}); {args.size}x{args.size}, DDIM {args.steps} steps, "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    intervals = [int(x) for x in args.intervals.split(",")]
    if intervals[0] != 1:
        intervals.insert(0, 1)
    seeds = [int(s) for s in args.seeds.split(",")]
    times: dict[int, list[float]] = {i: [] for i in intervals}
    images: dict[tuple[int, int], Any] = {}
    # One warm-up call per interval (first-call costs), then alternating rounds.
    for interval in intervals:
        spec = GenerationSpec(args.size, args.size, 2, 7.5, "ddim", 0.0, cache_interval=interval)
        backend.generate(spec, [ImageTask(PROMPT, NEGATIVE, 0)])
    for _ in range(args.repeats):
        for interval in intervals:
            spec = GenerationSpec(args.size, args.size, args.steps, 7.5, "ddim", 0.0, cache_interval=interval)
            for seed in seeds:
                started = time.perf_counter()
                result = backend.generate(spec, [ImageTask(PROMPT, NEGATIVE, seed)])
                times[interval].append(time.perf_counter() - started)
                images[(interval, seed)] = np.asarray(result.images[0], dtype=np.float64)
    base = statistics.median(times[1])
    rows = []
    for interval in intervals:
        diffs = [np.abs(images[(interval, s)] - images[(1, s)]) for s in seeds]
        full = len(range(0, args.steps, interval))
        median = statistics.median(times[interval])
        rows.append(
            [
                "off" if interval == 1 else interval,
                f"{full}/{args.steps}",
                f"{median:.2f}",
                f"{base / median:.2f}x",
                f"{statistics.mean(float(d.mean()) for d in diffs):.2f}",
                f"{max(float(d.max()) for d in diffs):.0f}",
            ]
        )
    print()
    print(
        table(
            [
                "cache_interval",
                "full UNet passes",
                "s/image (median)",
                "speed-up vs off (same run)",
                "pixel MAE vs off",
                "pixel max diff",
            ],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
