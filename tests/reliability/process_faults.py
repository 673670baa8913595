"""Process-level faults with the real processes and the tiny demo model: ``sd-endpoint serve`` SIGKILLed under
load and restarted, and ``sd-endpoint batch`` SIGKILLed mid-run and run again. Shared by
tests/reliability/test_process_faults.py and benchmarks/reliability.py; each scenario asserts its rules and
returns what it counted. No pytest import here.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from tests.support.servers import SD_ENDPOINT, LiveServer, model_env

# Small and quick per request, so the kill lands among many finished and in-flight requests.
_PARAMS: dict[str, Any] = {"height": 64, "width": 64, "num_inference_steps": 4}


def _request(prompt: str, seed: int) -> dict[str, Any]:
    return {"input_data": {"columns": ["prompt"], "data": [prompt]}, "parameters": {"seed": seed, **_PARAMS}}


def _wait(predicate: Any, what: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def sigkill_under_load(model_dir: Path, cache_dir: Path, workdir: Path, clients: int = 4) -> Counter[str]:
    """Clients send requests back to back; the server is SIGKILLed with requests in flight, then started again.

    Every request ends one way or the other, at once: a 200 carrying its own prompt and seed, or a connection
    error the client sees (nothing hangs). The restarted server is ready again and serves.
    """
    env = model_env(model_dir, cache_dir, max_concurrent_requests=clients, request_timeout_ms=600_000)
    server = LiveServer(env, workdir / "killed.log").start(timeout=900)
    out: Counter[str] = Counter()
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(10_000):
            prompt, seed = f"client {i} request {j}", i * 10_000 + j
            try:
                resp = httpx.post(f"{server.url}/score", json=_request(prompt, seed), timeout=600)
            except httpx.TransportError:
                with lock:
                    out["connection error (the kill)"] += 1
                return
            assert resp.status_code == 200, resp.text[:300]
            (record,) = resp.json()
            assert (record["prompt"], record["seed"]) == (prompt, seed)
            with lock:
                out["200 before the kill"] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    try:
        for t in threads:
            t.start()
        _wait(lambda: out["200 before the kill"] >= 2 * clients, "answers under load", timeout=900)
        _wait(lambda: server.metrics().get("sd_requests_in_flight", 0) >= 1, "requests in flight", timeout=300)
        assert server.proc is not None
        server.proc.kill()
        assert server.proc.wait(60) == -9
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a client hung after the kill"
        assert out["connection error (the kill)"] == clients  # every client's last request ended in an error
    finally:
        server.stop()

    restarted = LiveServer(env, workdir / "restarted.log")
    started = time.monotonic()
    restarted.start(timeout=900)
    try:
        out["seconds to ready again"] = round(time.monotonic() - started)
        resp = httpx.post(f"{restarted.url}/score", json=_request("after the restart", 7), timeout=600)
        assert resp.status_code == 200 and resp.json()[0]["seed"] == 7
        out["200 after the restart"] += 1
    finally:
        assert restarted.stop() == 0
    return out


def _batch(model_dir: Path, cache_dir: Path, src: Path, dst: Path, log: Path) -> subprocess.Popen[bytes]:
    command = [str(SD_ENDPOINT), "batch", str(src), str(dst), "--model", str(model_dir), "--device", "cpu"]
    command += ["--dtype", "float32", "--parameters", json.dumps({**_PARAMS, "num_inference_steps": 20}), "-q"]
    env = {**model_env(model_dir, cache_dir), "SD_ENDPOINT_MAX_BATCH_SIZE": "2"}
    with log.open("wb") as sink:
        return subprocess.Popen(command, env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT)


def batch_killed_and_resumed(model_dir: Path, cache_dir: Path, workdir: Path, prompts: int = 24) -> Counter[str]:
    """``sd-endpoint batch`` is SIGKILLed once its first images are on disk, then run again on the same folders.

    The second run generates only what is missing; in the end every prompt has exactly one row in
    predictions.csv (read as Azure's notebooks read it) and one image that decodes, and no image is partial.
    """
    src = workdir / "prompts.txt"
    src.write_text("".join(f"prompt number {n}\n" for n in range(prompts)), encoding="utf-8")
    dst = workdir / "out"
    first = _batch(model_dir, cache_dir, src, dst, workdir / "first.log")
    _wait(lambda: any(dst.glob("*.png")) or first.poll() is not None, "the first image", timeout=900)
    first.kill()
    first.wait(60)
    assert first.returncode == -9, "the batch run ended before the kill: " + (workdir / "first.log").read_text()[-500:]
    before = sorted(p.name for p in dst.glob("*.png"))
    assert 0 < len(before) < prompts
    for png in dst.glob("*.png"):
        with Image.open(png) as image:
            image.load()  # an image on disk is always whole (written to a temporary name, then renamed)

    second = _batch(model_dir, cache_dir, src, dst, workdir / "second.log")
    assert second.wait(900) == 0, (workdir / "second.log").read_text()[-2000:]
    log = (workdir / "second.log").read_text()
    found = re.findall(r"(\d+) generated, (\d+) already present", log)
    assert found, log[-1000:]
    generated, present = map(int, found[-1])
    assert present == len(before), log[-1000:]  # every image on disk was kept, none generated twice

    with (dst / "predictions.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))  # no header, Azure's five fields
    assert all(len(row) == 5 for row in rows)
    assert sorted(int(row[0]) for row in rows) == list(range(prompts))  # every row once, none twice
    assert {row[1] for row in rows} == {f"prompt number {n}" for n in range(prompts)}
    images = [dst / row[2] for row in rows]
    assert len(set(images)) == prompts and set(before) <= {p.name for p in images}
    for path in images:
        with Image.open(path) as image:
            image.load()
    return Counter(
        {
            "images before the kill": len(before),
            "generated on the rerun": generated,
            "rows in predictions.csv": len(rows),
            "missing or duplicate rows": 0,
        }
    )
