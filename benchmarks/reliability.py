"""Reliability figures for the README: inputs tried, load held, faults survived, and what was lost.

Runs the scenarios of tests/reliability/ (the real app and uvicorn on loopback, FakeBackend as the model)
with larger counts than the test suite, then prints one table and the machine. Every scenario asserts its
rules as it goes (only the allowed statuses, JSON errors, one answer per request, each image its own), so
a row in the table is a run that held them. Usage::

    PYTHONPATH=src:. python benchmarks/reliability.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "src")) if p not in sys.path]

from benchmarks._common import print_machine, table  # noqa: E402
from tests.reliability import process_faults, scenarios  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the test suite's counts (about a minute)")
    args = parser.parse_args()
    scale = 1 if args.quick else 4
    rows: list[list[Any]] = []

    def timed(name: str, fn: Any) -> Any:
        started = time.perf_counter()
        result = fn()
        rows.append([name, *describe(result), f"{time.perf_counter() - started:.1f}"])
        return result

    with scenarios.fake_server(max_concurrent_requests=2, max_queued_requests=2, max_queue_wait_ms=50) as server:
        timed("fuzz POST /score (hypothesis)", lambda: scenarios.fuzz_score(server.url, 150 * scale))
        timed("fuzz every operation (schemathesis)", lambda: scenarios.fuzz_openapi(server.url, 15 * scale))
        timed("load past capacity (c=12)", lambda: scenarios.load_past_capacity(server, 60 * scale, 12))
        timed("soak (c=4, 1-step requests)", lambda: scenarios.soak(server, 600 * scale))
    with scenarios.fake_server(max_concurrent_requests=4, max_batch_size=4) as server:
        timed("backend raises inside a merged call", lambda: scenarios.bad_member_in_merged_calls(server, 3 * scale))
    with scenarios.fake_server() as server:
        timed("clients disconnect mid-generation", lambda: scenarios.disconnects(server, 3 * scale))
    timed("AACS down / slow / flapping", lambda: scenarios.screening_faults(2 * scale))
    with scenarios.fake_server(body_read_timeout_s=1.0) as server:
        timed("slow-body connections (1 s timeout)", lambda: scenarios.slow_bodies(server, 20 * scale, 1.0))

    with scenarios.fake_server(max_concurrent_requests=2) as server:
        timed("requests uvicorn's parser refuses", lambda: scenarios.malformed_http(server))
    with scenarios.fake_server(max_connections=8) as server:
        timed("past the connection cap (8)", lambda: scenarios.connection_cap(server, 8))
    with tempfile.TemporaryDirectory() as tmp:
        from sd_endpoint.model.demo import write_demo_model

        work = Path(tmp)
        model = write_demo_model(work / "tiny-sd21", cache_dir=work / "cache")
        (work / "kill").mkdir()
        (work / "batch").mkdir()
        timed(
            "serve SIGKILLed under load, restarted",
            lambda: process_faults.sigkill_under_load(model, work / "cache", work / "kill", clients=2 * scale),
        )
        timed(
            "batch CLI SIGKILLed mid-run, rerun",
            lambda: process_faults.batch_killed_and_resumed(model, work / "cache", work / "batch", 12 * scale),
        )

    print(table(["scenario", "requests", "answers", "lost", "seconds"], rows))  # noqa: T201
    print_machine()
    return 0


def describe(result: Any) -> tuple[int, str, int]:
    """(requests, what they got, lost) for one scenario's result."""
    if isinstance(result, scenarios.Fuzzed):
        return result.tried, _statuses(result.statuses), 0
    if isinstance(result, scenarios.Load):
        lost = result.sent - sum(result.statuses.values())
        return result.sent, _statuses(result.statuses) + (", /metrics exact" if result.metrics_match else ""), lost
    if isinstance(result, scenarios.Soak):
        flat = (
            f"RSS {result.rss_mb[0]:.0f}->{result.rss_mb[1]:.0f} MB ({result.rss_slope_kb_per_1k:+.0f} kB/1k req), "
            f"fds {result.fds[0]}->{result.fds[1]}, threads {result.threads[0]}->{result.threads[1]}"
        )
        return result.requests, flat, 0
    counts = {k: v for k, v in result.items() if k != "seconds"}
    requests = counts.get("rows in predictions.csv") or sum(v for k, v in counts.items() if not k.startswith("seconds"))
    return requests, ", ".join(f"{k}: {v}" for k, v in counts.items()), 0


def _statuses(statuses: Any) -> str:
    return " ".join(f"{code}x{n}" for code, n in sorted(statuses.items()))


if __name__ == "__main__":
    raise SystemExit(main())
