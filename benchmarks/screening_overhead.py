"""Latency that content screening adds to a request, measured against the local AACS emulator.

Runs the same requests through GenerationService without a screener and with the real
AzureContentSafetyScreener (azure-ai-contentsafety SDK -> HTTP on loopback -> emulator in a separate
process), alternating the two so that drift hits both, and prints per request shape: median and p90
latency of each, the median added milliseconds, the ratio, and the median time of each screening stage.

The emulator answers in well under a millisecond, so the numbers are the client-side cost of screening
(SDK, JSON, base64, HTTP, thread pool, image fitting) plus loopback; against Azure add the network round
trip and the service's own time, once per stage because the calls of a stage run concurrently.

    .venv/bin/python benchmarks/screening_overhead.py [--repeats 20] [--model DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KEY = "bench-key"


def serve_emulator(queue: Any, stop: Any) -> None:
    from aacs_emulator import AacsEmulator

    with AacsEmulator(key=KEY) as emu:  # the built-in policy; benchmark prompts are all safe
        queue.put(emu.url)
        stop.wait()


def request(prompts: int, images: int, size: int, steps: int) -> dict[str, Any]:
    return {
        "input_data": {"columns": ["prompt"], "data": [f"a lighthouse on a cliff, view {i}" for i in range(prompts)]},
        "parameters": {
            "num_inference_steps": steps,
            "height": size,
            "width": size,
            "seed": 7,
            "num_images_per_prompt": images,
            "negative_prompt": "blurry, low quality",
        },
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=20, help="Requests per shape and configuration.")
    parser.add_argument("--model", help="Model folder (default: the tiny demo model, built in a temp dir).")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from sd_endpoint.backends import create_backend
    from sd_endpoint.model.demo import write_demo_model
    from sd_endpoint.safety.aacs import AzureContentSafetyScreener
    from sd_endpoint.service import GenerationService
    from sd_endpoint.settings import ContentSafetySettings, load_settings

    ctx = mp.get_context("spawn")
    queue, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=serve_emulator, args=(queue, stop), daemon=True)
    proc.start()
    try:
        url = queue.get(timeout=60)
        tmpdir = tempfile.TemporaryDirectory(prefix="screening-bench-")
        tmp = Path(tmpdir.name)
        model = args.model or str(write_demo_model(tmp / "tiny", cache_dir=tmp / "cache"))
        settings = load_settings(model=model, device="cpu", dtype="float32", cache_dir=tmp / "cache", warmup=False)
        backend = create_backend(settings)
        screener = AzureContentSafetyScreener.from_settings(ContentSafetySettings(endpoint=url, key=KEY))
        plain = GenerationService(settings, backend)
        screened = GenerationService(settings, backend, screener)

        shapes = [  # (prompts, images per prompt, side, steps)
            (1, 1, 64, 3),
            (4, 1, 64, 3),
            (4, 2, 64, 3),
            (1, 1, 512, 2),
        ]
        print(
            f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)"
        )
        print(f"model: {model}; emulator: {url} (separate process); repeats: {args.repeats}\n")
        header = (
            f"{'request':<22}{'plain':>10}{'screened':>10}{'diff':>9}{'ratio':>7}"
            f"{'prompt st.':>12}{'image st.':>11}{'stages':>9}{'stages p90':>12}{'calls':>7}"
        )
        print(header)
        print("-" * len(header))
        for prompts, images, side, steps in shapes:
            body = request(prompts, images, side, steps)
            for svc in (plain, screened):  # warm both paths (connections, lazy imports)
                svc.handle(body)
            base: list[float] = []
            with_screening: list[float] = []
            stage_prompt: list[float] = []
            stage_image: list[float] = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                plain.handle(body)
                base.append(time.perf_counter() - t)
                t = time.perf_counter()
                result = screened.handle(body)
                with_screening.append(time.perf_counter() - t)
                stage_prompt.append(result.timings.get("screen_prompt", 0.0))
                stage_image.append(result.timings.get("screen_image", 0.0))
            b, s = statistics.median(base), statistics.median(with_screening)
            diff = statistics.median([y - x for x, y in zip(base, with_screening, strict=True)])
            stages = [p + i for p, i in zip(stage_prompt, stage_image, strict=True)]
            # Text calls: each prompt plus the shared negative prompt (screened once); image calls: one each.
            calls = f"{prompts + 1}+{prompts * images}"
            name = f"{prompts}x{images} {side}px {steps}st"
            ms = 1e3
            print(
                f"{name:<22}{b * ms:>8.1f}ms{s * ms:>8.1f}ms{diff * ms:>7.1f}ms{s / b:>7.2f}"
                f"{statistics.median(stage_prompt) * ms:>10.1f}ms{statistics.median(stage_image) * ms:>9.1f}ms"
                f"{statistics.median(stages) * ms:>7.1f}ms{pct(stages, 0.9) * ms:>10.1f}ms{calls:>7}"
            )
        print(
            "\nplain/screened: median request latency; diff: median of paired differences; ratio: screened/plain;"
            "\nprompt st./image st./stages: median time of the screening stages inside the screened requests"
            "\n(the latency screening adds, since each stage runs before/after generation); calls: text+image."
        )
        screened.close()
        plain.close()
        tmpdir.cleanup()
    finally:
        stop.set()
        proc.join(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
