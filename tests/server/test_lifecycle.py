"""The real server's behaviour over time: timeouts and disconnects stop their generation, SIGTERM drains,
and a model that cannot load stops the process. Each test proves the work stopped through the server's
own counters (denoising steps run, generations stopped by reason).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.helpers import decode_image
from tests.support.net import free_port
from tests.support.servers import SD_ENDPOINT, LiveServer, model_env

pytestmark = pytest.mark.slow

# Four 512x512 images with 150 steps: several seconds on any CPU, well past the 3 s timeout below.
LONG = {"height": 512, "width": 512, "num_inference_steps": 150, "num_images_per_prompt": 4}


def request(prompt: str, seed: int, **params: Any) -> dict[str, Any]:
    return {"input_data": {"columns": ["prompt"], "data": [prompt]}, "parameters": {"seed": seed, **params}}


def wait_until(predicate: Any, what: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def short_timeout_server(
    tiny_model_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    env = model_env(tiny_model_dir, cache_dir, request_timeout_ms=3000, log_format="json")
    with LiveServer(env, tmp_path_factory.mktemp("timeout") / "server.log").serving() as live:
        yield live


def test_a_timeout_gets_408_and_its_generation_stops(short_timeout_server: LiveServer) -> None:
    server = short_timeout_server
    before = server.metrics()
    stopped_key = 'sd_generations_stopped_total{reason="timeout"}'
    resp = httpx.post(f"{server.url}/score", json=request("too slow", 1, **LONG), timeout=300)
    assert resp.status_code == 408
    assert "SD_ENDPOINT_REQUEST_TIMEOUT_MS (3000 ms)" in resp.json()["message"]
    wait_until(lambda: server.metrics().get(stopped_key, 0) == before.get(stopped_key, 0) + 1, "the stop")
    after = server.metrics()
    steps_run = after["sd_denoising_steps_total"] - before.get("sd_denoising_steps_total", 0)
    assert steps_run < LONG["num_inference_steps"]  # stopped between steps, long before the end
    assert after.get("sd_images_generated_total", 0) == before.get("sd_images_generated_total", 0)
    time.sleep(0.5)
    assert server.metrics()["sd_denoising_steps_total"] == after["sd_denoising_steps_total"]  # nothing runs on
    assert httpx.get(f"{server.url}/ready").status_code == 200  # and the server serves on


def test_a_client_that_disconnects_stops_its_generation(short_timeout_server: LiveServer) -> None:
    server = short_timeout_server
    before = server.metrics()
    stopped_key = 'sd_generations_stopped_total{reason="client disconnected"}'
    body = json.dumps(request("abandoned", 3, **LONG)).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /score HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nx-request-id: goes-away\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: server.metrics().get("sd_requests_in_flight") == 1, "the request to be admitted")
    wait_until(lambda: server.metrics().get(stopped_key, 0) == before.get(stopped_key, 0) + 1, "the stop")
    after = server.metrics()
    assert after["sd_denoising_steps_total"] - before.get("sd_denoising_steps_total", 0) < LONG["num_inference_steps"]
    wait_until(lambda: '"goes-away"' in server.logs(), "the request's log line")
    (line,) = [
        json.loads(raw)
        for raw in server.logs().splitlines()
        if '"request_id": "goes-away"' in raw and '"sd_endpoint.access"' in raw
    ]
    assert line["status"] == 499


@pytest.mark.timeout(1800)  # a start-up and 300 steps: minutes on a loaded 2-core machine; not about time
def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    # One request at a time (no merging), so the last one is still queued behind the others at SIGTERM.
    env = model_env(
        tiny_model_dir,
        cache_dir,
        max_concurrent_requests=4,
        max_batch_size=1,
        request_timeout_ms=600_000,
        shutdown_grace_s=600,
    )
    server = LiveServer(env, tmp_path / "server.log").start(timeout=900)
    results: dict[int, httpx.Response] = {}

    def send(i: int) -> None:
        body = request(f"in flight {i}", 40 + i, height=64, width=64, num_inference_steps=100)
        results[i] = httpx.post(f"{server.url}/score", json=body, timeout=600)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: server.metrics().get("sd_requests_in_flight") == 3, "three requests in flight", 600)
        assert server.proc is not None
        server.proc.terminate()  # SIGTERM
        refused = False
        end = time.monotonic() + 60
        while not refused and time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=5):
                    pass
                time.sleep(0.05)
            except ConnectionRefusedError:
                refused = True
        assert refused, "the server kept accepting connections after SIGTERM"
        assert any(t.is_alive() for t in threads)  # refused while requests were still in flight
        for t in threads:
            t.join(600)
        assert server.proc.wait(120) == 0
    finally:
        server.stop()
    for i in range(3):
        assert results[i].status_code == 200, results[i].text
        (record,) = results[i].json()
        assert (record["prompt"], record["seed"]) == (f"in flight {i}", 40 + i)
        decode_image(record)
    assert "Waiting for connections to close" in server.logs() or "Shutting down" in server.logs()


def test_a_model_that_cannot_load_exits_with_status_2(cache_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    env = {**model_env(tmp_path / "no-such-model", cache_dir), "HF_HUB_OFFLINE": "1"}
    import os

    with log.open("wb") as out:
        proc = subprocess.run(
            [str(SD_ENDPOINT), "serve", "--host", "127.0.0.1", "--port", str(free_port())],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    text = log.read_text()
    assert proc.returncode == 2, text[-3000:]
    assert "SD_ENDPOINT_MODEL" in text and "no-such-model" in text


def test_past_the_shutdown_grace_the_generation_is_stopped_and_the_process_exits(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    env = model_env(tiny_model_dir, cache_dir, shutdown_grace_s=1, request_timeout_ms=600_000)
    server = LiveServer(env, tmp_path / "server.log").start()
    outcome: list[Any] = []

    def send() -> None:
        try:
            outcome.append(httpx.post(f"{server.url}/score", json=request("never finishes", 5, **LONG), timeout=600))
        except httpx.HTTPError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=send)
    try:
        thread.start()
        wait_until(lambda: server.metrics().get("sd_requests_in_flight") == 1, "the request to be admitted")
        assert server.proc is not None
        server.proc.terminate()
        assert server.proc.wait(120) == 0
        thread.join(60)
    finally:
        server.stop()
    (result,) = outcome
    assert isinstance(result, httpx.Response), result
    assert result.status_code == 503 and "SD_ENDPOINT_SHUTDOWN_GRACE_S" in result.json()["message"]
    assert result.headers["retry-after"] == "5"
    logs = server.logs()
    assert "Generation stopped after" in logs and "server shutting down" in logs
