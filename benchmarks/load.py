"""CPU generation under load: the same small request idle and with two busy processes per core beside it.

A fair scheduler gives our request's T threads T/(B+T) of the machine when B single-threaded busy processes
run beside it on C cores, so the ideal slowdown is (B + T) / C (3x for B = 4, T = 2, C = 2). The row to read is
"slowdown / ideal": 1 means the request got exactly its share; the target is within 2x. Two configurations,
each in a fresh process (the OpenMP wait policy is read once, when torch loads):

* ``spin`` (OMP_WAIT_POLICY=ACTIVE): OpenMP threads spin at every barrier, as torch's default did for us;
* ``ours``: what the sd-endpoint entry points set (``sd_endpoint.cpu_policy``: OMP_WAIT_POLICY=PASSIVE).

Each child loads the demo model, runs the request ``--repeats`` times idle, then the parent starts the busy
processes and the child runs it again. The machine's load average is printed at each phase: on a shared
machine "idle" means "without our busy processes", and the other tenants' load is part of both phases.

    .venv/bin/python benchmarks/load.py [--size 256] [--steps 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import DEFAULT_CACHE, print_machine, table

HERE = Path(__file__).resolve()


def child(size: int, steps: int, repeats: int, cache_dir: Path) -> None:
    """Runs in a fresh interpreter: demo model, warm-up, then timed requests idle, then (after 'go') loaded."""
    from sd_endpoint.cpu_policy import prefer_passive_waits

    if os.environ.get("OMP_WAIT_POLICY") is None:
        prefer_passive_waits()  # exactly what our entry points do
    import torch

    from sd_endpoint.safety.base import NullScreener
    from sd_endpoint.service import GenerationService
    from sd_endpoint.settings import load_settings

    settings = load_settings(model="demo", device="cpu", dtype="float32", cache_dir=cache_dir)
    service = GenerationService.from_settings(settings, screener=NullScreener())
    service.warmup()
    body = {
        "input_data": {"data": ["a lighthouse at dawn"]},
        "parameters": {"num_inference_steps": steps, "height": size, "width": size, "seed": 7},
    }
    service.handle(body)  # pays any first-use cost at this size

    def timed() -> list[float]:
        out = []
        for _ in range(repeats):
            started = time.perf_counter()
            service.handle(body)
            out.append(time.perf_counter() - started)
        return out

    idle = timed()
    print(json.dumps({"phase": "idle", "seconds": idle, "threads": torch.get_num_threads()}), flush=True)
    sys.stdin.readline()  # the parent has started the busy processes
    loaded = timed()
    print(json.dumps({"phase": "loaded", "seconds": loaded, "policy": os.environ.get("OMP_WAIT_POLICY")}), flush=True)


BUSY = "while True:\n    pass\n"


def run_config(name: str, policy: str | None, args: argparse.Namespace, busy_count: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, str(HERE), "--child", "--size", str(args.size), "--steps", str(args.steps)]
    cmd += ["--repeats", str(args.repeats), "--cache-dir", str(args.cache_dir)]
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdin is not None and proc.stdout is not None

    def result() -> dict[str, Any]:
        assert proc.stdout is not None
        for line in proc.stdout:  # libraries may print to stdout too: take our JSON lines only
            if line.startswith('{"phase"'):
                parsed: dict[str, Any] = json.loads(line)
                return parsed
        log.seek(0)
        raise RuntimeError(f"{name}: the child exited ({proc.wait()}):\n{log.read()[-3000:]}")

    busy: list[subprocess.Popen[bytes]] = []
    try:
        idle = result()
        load_idle = os.getloadavg()[0]
        busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy_count)]
        time.sleep(1.0)  # let the scheduler see them
        proc.stdin.write("go\n")
        proc.stdin.flush()
        loaded = result()
        load_busy = os.getloadavg()[0]
    finally:
        for p in busy:
            p.kill()
            p.wait()
        proc.stdin.close()
        proc.wait(timeout=60)
    return {
        "name": name,
        "policy": loaded["policy"],
        "threads": idle["threads"],
        "idle_s": statistics.median(idle["seconds"]),
        "loaded_s": statistics.median(loaded["seconds"]),
        "load_avg_idle": load_idle,
        "load_avg_busy": load_busy,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy-per-core", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.size, args.steps, args.repeats, args.cache_dir)
        return 0

    cores = len(os.sched_getaffinity(0))
    busy_count = args.busy_per_core * cores
    print_machine()
    print(
        f"Request: demo model, {args.size}x{args.size}, {args.steps} steps, median of {args.repeats}; "
        f"loaded = {busy_count} busy processes on {cores} cores. The machine may be shared: see the load averages.",
        flush=True,
    )
    results = []
    for name, policy in (("spin (OMP_WAIT_POLICY=ACTIVE)", "ACTIVE"), ("ours (sd_endpoint.cpu_policy)", None)):
        res = run_config(name, policy, args, busy_count)
        res["ideal"] = (busy_count + min(res["threads"], cores)) / cores
        res["slowdown"] = res["loaded_s"] / res["idle_s"]
        res["vs_ideal"] = res["slowdown"] / res["ideal"]
        results.append(res)
        print(f"  {name}: idle {res['idle_s']:.2f} s, loaded {res['loaded_s']:.2f} s", flush=True)
    print()
    print(
        table(
            [
                "configuration",
                "torch threads",
                "idle, s",
                "loaded, s",
                "slowdown",
                "ideal (fair share)",
                "slowdown / ideal",
                "load avg idle / loaded",
            ],
            [
                [
                    r["name"],
                    r["threads"],
                    r["idle_s"],
                    r["loaded_s"],
                    f"{r['slowdown']:.1f}x",
                    f"{r['ideal']:.1f}x",
                    f"{r['vs_ideal']:.2f}",
                    f"{r['load_avg_idle']:.1f} / {r['load_avg_busy']:.1f}",
                ]
                for r in results
            ],
        )
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
