"""Cold start: process start to ready, against the raw disk read of the same weights and plain from_pretrained.

Every measurement runs in a fresh Python process, after the weight files are dropped from the page cache
(``posix_fadvise(POSIX_FADV_DONTNEED)`` on each file: no root needed and no other process's cache is
touched; ``--drop-caches`` uses /proc/sys/vm/drop_caches instead, which needs root and drops everything).
The rows:

* raw read: ``read()`` of every weight file in 16 MiB pieces, cold, then the same with ``O_DIRECT`` (no page
  cache), then warm; the faster cold read is the physical limit the ratios refer to;
* imports: ``import torch`` plus diffusers' StableDiffusionPipeline and transformers' CLIP, nothing loaded:
  the floor any Python loader pays before it can read a tensor;
* ours, service ready: ``GenerationService.from_settings`` with SD_ENDPOINT_WARMUP=false, i.e. the service
  up to ready (prefetch, early reading, fast loader, backend), to the dtype the service picks here;
* ours, ready after the warm-up: the same plus the warm-up generation, i.e. the time to ready of score.py's
  ``init()`` and of ``sd-endpoint serve`` (the warm-up runs at 128x128 on a CPU, the native size on a GPU);
* from_pretrained: ``StableDiffusionPipeline.from_pretrained(folder, torch_dtype=<same dtype>)``
  (plus ``.to(device)``);
* loading alone: the same two loaders timed after their imports, the cache still cold: loader against disk;
* on the CPU, the service and from_pretrained again in fp16, the files' dtype (no conversion).

Time to ready is measured by this parent process, from spawning the child to reading its "ready" line;
peak memory is the child's peak RSS (``ru_maxrss``), against the bytes of the weight files.

    .venv/bin/python benchmarks/cold_start.py [--model DIR] [--repeats 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import DEFAULT_CACHE, full_size_model, machine, print_machine, table, weight_files

HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------------------------
# Children: each prints one JSON line, {"ready": true, ...}, when its work is done.


def child(mode: str, folder: Path, dtype: str, device: str, cache_dir: Path) -> dict[str, Any]:
    import resource

    started = time.perf_counter()
    out: dict[str, Any] = {}
    if mode in ("read-cold", "read-warm"):
        total = 0
        for f in weight_files(folder):
            with open(f, "rb", buffering=0) as fh:
                while chunk := fh.read(16 << 20):
                    total += len(chunk)
        out["bytes"] = total
    elif mode == "read-direct":  # O_DIRECT into one aligned buffer: the disk, without the page cache
        import mmap

        buf = memoryview(mmap.mmap(-1, 16 << 20))  # anonymous maps are page-aligned
        total = 0
        for f in weight_files(folder):
            fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
            offset = 0
            try:
                while (n := os.preadv(fd, [buf], offset)) > 0:
                    offset += n
            finally:
                os.close(fd)
            total += offset
        out["bytes"] = total
    elif mode == "imports":
        import torch  # noqa: F401
        from diffusers import StableDiffusionPipeline  # noqa: F401
        from transformers import CLIPTextModel  # noqa: F401
    elif mode in ("ours", "ours-warm"):
        from sd_endpoint.safety.base import NullScreener
        from sd_endpoint.service import GenerationService
        from sd_endpoint.settings import load_settings

        warm = mode == "ours-warm"  # the real start-up: the warm-up generation included
        settings = load_settings(model=str(folder), device=device, dtype=dtype, cache_dir=cache_dir, warmup=warm)
        service = GenerationService.from_settings(settings, screener=NullScreener())
        out["warmup_s"] = service.warmup()  # with SD_ENDPOINT_WARMUP=false it only marks the service ready
        out["warmup_size"] = "x".join(map(str, service.warmup_size()))
        assert service.ready
        out["describe"] = {k: str(v) for k, v in service.backend.describe().items() if k in ("dtype", "device")}
    elif mode in ("from_pretrained", "from_pretrained-load-only", "ours-load-only"):
        import torch
        from diffusers import StableDiffusionPipeline
        from transformers import CLIPTextModel  # noqa: F401

        if mode.endswith("load-only"):  # time the loading alone: imports done, cache still cold
            out["imports_s"] = time.perf_counter() - started
            started = time.perf_counter()
        if mode == "ours-load-only":
            from sd_endpoint.model.fast_load import load_folder

            load_folder(folder, device, dtype)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(folder),
                torch_dtype=getattr(torch, dtype),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.to(device)
    else:
        raise SystemExit(f"unknown mode {mode}")
    out["inside_s"] = time.perf_counter() - started
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["ready"] = True
    return out


def evict(files: list[Path], drop_caches: bool) -> None:
    if drop_caches:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def spawn(mode: str, args: argparse.Namespace, folder: Path, dtype: str) -> dict[str, Any]:
    files = weight_files(folder)
    if mode != "read-warm":
        evict(files, args.drop_caches)
    else:  # make sure they are cached
        child("read-cold", folder, dtype, args.device, args.cache_dir)
    cmd = [
        sys.executable,
        str(HERE),
        "--child",
        mode,
        "--model",
        str(folder),
        "--dtype",
        dtype,
        "--device",
        args.device,
        "--cache-dir",
        str(args.cache_dir),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    result: dict[str, Any] | None = None
    for line in proc.stdout:
        if line.startswith("{"):
            result = json.loads(line)
            result["ready_s"] = time.perf_counter() - started
            break
    proc.wait(timeout=600)
    if result is None or proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed (exit {proc.returncode})")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, help="Full-size diffusers folder (default: built into the cache).")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="The service's dtype (auto: what it picks here).")
    parser.add_argument("--drop-caches", action="store_true", help="Use /proc/sys/vm/drop_caches (root).")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args.child, args.model, args.dtype, args.device, args.cache_dir)), flush=True)
        return 0

    folder = full_size_model(args.model, args.cache_dir)
    if args.dtype == "auto":  # what the service picks on this machine, for both loaders
        from sd_endpoint.model.placement import choose_placement
        from sd_endpoint.settings import load_settings

        args.dtype = choose_placement(load_settings(device=args.device)).dtype_name
    info = machine()
    print_machine(info)
    weight_bytes = sum(f.stat().st_size for f in weight_files(folder))
    print(
        f"Model: {folder}: {weight_bytes / 1e9:.2f} GB of fp16 safetensors; device {args.device}; "
        f"page cache: {'drop_caches' if args.drop_caches else 'per-file POSIX_FADV_DONTNEED'}; "
        f"{args.repeats} repeats, median shown",
        flush=True,
    )

    plan = [
        ("raw read, cold", "read-cold", args.dtype),
        ("raw read, cold, O_DIRECT", "read-direct", args.dtype),
        ("raw read, warm cache", "read-warm", args.dtype),
        ("imports only (torch, diffusers, CLIP)", "imports", args.dtype),
        (f"ours: service ready ({args.dtype})", "ours", args.dtype),
        (f"ours: ready after the warm-up generation ({args.dtype}), as the servers start", "ours-warm", args.dtype),
        (f"from_pretrained ({args.dtype})", "from_pretrained", args.dtype),
        (f"ours: loading alone, after imports ({args.dtype})", "ours-load-only", args.dtype),
        (f"from_pretrained: loading alone, after imports ({args.dtype})", "from_pretrained-load-only", args.dtype),
    ]
    if args.device == "cpu" and args.dtype != "float16":  # the same without a dtype conversion
        plan += [
            ("ours: service ready (float16)", "ours", "float16"),
            ("from_pretrained (float16)", "from_pretrained", "float16"),
        ]
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in plan}
    for r in range(args.repeats):
        for label, mode, dtype in plan:
            res = spawn(mode, args, folder, dtype)
            results[label].append(res)
            print(
                f"  repeat {r + 1} {label}: ready {res['ready_s']:.2f} s, peak RSS {res['peak_rss'] / 1e9:.2f} GB"
                + (f" {res['describe']}" if "describe" in res else "")
                + (f", warm-up {res['warmup_s']:.2f} s at {res['warmup_size']}" if res.get("warmup_s") else ""),
                flush=True,
            )

    def med(label: str, key: str) -> float:
        return statistics.median(x[key] for x in results[label])

    # The physical limit: the faster of the two cold reads of the same bytes.
    raw_read = min(med("raw read, cold", "inside_s"), med("raw read, cold, O_DIRECT", "inside_s"))
    rows = []
    summary: dict[str, Any] = {"machine": info, "weight_bytes": weight_bytes, "rows": {}}
    for label, mode, _ in plan:
        ready = med(label, "ready_s")
        inside = med(label, "inside_s")
        rss = med(label, "peak_rss")
        summary["rows"][label] = {"ready_s": ready, "inside_s": inside, "peak_rss": rss}
        alone_row = mode.endswith("load-only")  # timed inside, after imports that are not counted
        rows.append(
            [
                label,
                "-" if alone_row else ready,
                inside,
                f"{weight_bytes / inside / 1e9:.2f}" if mode.startswith("read") else "",
                f"{(inside if alone_row else ready) / raw_read:.2f}x",
                rss / 1e9,
                f"{rss / weight_bytes:.2f}x",
            ]
        )
    print()
    print(
        table(
            [
                "run",
                "process start to ready, s",
                "inside the process, s",
                "GB/s",
                "time / raw read",
                "peak RSS, GB",
                "peak RSS / weight bytes",
            ],
            rows,
        )
    )
    ours = f"ours: service ready ({args.dtype})"
    plain = f"from_pretrained ({args.dtype})"
    alone = f"ours: loading alone, after imports ({args.dtype})"
    plain_alone = f"from_pretrained: loading alone, after imports ({args.dtype})"
    imports = med("imports only (torch, diffusers, CLIP)", "ready_s")
    print(
        f"\nSame run: the service is ready in {med(ours, 'ready_s'):.2f} s, from_pretrained in "
        f"{med(plain, 'ready_s'):.2f} s; the raw cold read takes {raw_read:.2f} s and the imports alone "
        f"{imports:.2f} s. "
        f"Ready / raw read = {med(ours, 'ready_s') / raw_read:.2f}x (target 1.5x). Loading alone, after the imports: "
        f"ours {med(alone, 'inside_s'):.2f} s = {med(alone, 'inside_s') / raw_read:.2f}x the raw read, from_pretrained "
        f"{med(plain_alone, 'inside_s'):.2f} s = {med(plain_alone, 'inside_s') / raw_read:.2f}x. Peak RSS / weight "
        f"bytes: ours {med(ours, 'peak_rss') / weight_bytes:.2f}x (target 1.3x), from_pretrained "
        f"{med(plain, 'peak_rss') / weight_bytes:.2f}x."
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
