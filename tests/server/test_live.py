"""The real server: ``sd-endpoint serve`` in a uvicorn process on loopback, with the tiny model on CPU.

One process serves the whole module (keys on, JSON logs, small default size so that the Azure samples,
which send no size, stay fast).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import requests
from PIL import Image

from tests.server.helpers import BAD_INPUTS, decode_image
from tests.support.servers import LiveServer, model_env

pytestmark = pytest.mark.slow

PRIMARY, SECONDARY = "live-primary-key-31415", "live-secondary-key-27182"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = model_env(
        tiny_model_dir,
        cache_dir,
        keys=f"{PRIMARY},{SECONDARY}",
        log_format="json",
        default_height=64,
        default_width=64,
        max_body_bytes=200_000,
        max_concurrent_requests=3,
        max_queued_requests=1,
        max_queue_wait_ms=100,
        max_batch_size=4,
        batch_wait_ms=500,  # only paid while another admitted request has yet to submit
        # No test here is about timeouts: a loaded machine must not turn a slow answer into a 408.
        request_timeout_ms=600_000,
    )
    with LiveServer(env, tmp_path_factory.mktemp("live") / "server.log", key=PRIMARY).serving() as live:
        yield live


def small(prompt: str, seed: int, steps: int = 3, **params: Any) -> dict[str, Any]:
    return {
        "input_data": {"columns": ["prompt"], "data": [prompt], "index": [0]},
        "parameters": {"num_inference_steps": steps, "height": 64, "width": 64, "seed": seed, **params},
    }


def post(server: LiveServer, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}/score", json=body, headers=server.headers(**headers), timeout=1200)


def test_every_route(server: LiveServer) -> None:
    live = httpx.get(f"{server.url}/")
    assert (live.status_code, live.text) == (200, "Healthy")
    assert httpx.get(f"{server.url}/ready").json() == {"status": "ready"}  # no key: only whether
    ready = httpx.get(f"{server.url}/ready", headers=server.headers()).json()
    assert (ready["status"], ready["backend"], ready["device"], ready["dtype"]) == (
        "ready",
        "diffusers",
        "cpu",
        "float32",
    )
    assert ready["prediction_type"] == "v_prediction" and ready["warmup_seconds"] > 0
    resp = post(server, small("a red fox", 3))
    assert resp.status_code == 200
    (record,) = resp.json()
    assert (record["prompt"], record["seed"], record["index"]) == ("a red fox", 3, 0)
    assert decode_image(record).size == (64, 64)
    assert httpx.get(f"{server.url}/swagger.json").json()["swagger"] == "2.0"
    assert httpx.get(f"{server.url}/openapi.json").json()["openapi"].startswith("3.1")
    assert "swagger-ui" in httpx.get(f"{server.url}/docs").text
    metrics = server.metrics()
    assert metrics['sd_requests_total{route="/score",status="200"}'] >= 1
    assert metrics["sd_ready"] == 1 and metrics["sd_model_load_seconds"] > 0
    assert httpx.get(f"{server.url}/nope").json()["message"].startswith("The requested URL was not found")
    wrong = httpx.delete(f"{server.url}/score")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "OPTIONS, POST"


def test_auth_with_each_key_and_bad_ones(server: LiveServer) -> None:
    for key in (PRIMARY, SECONDARY):
        assert post(server, small("a key", 1), Authorization=f"Bearer {key}").status_code == 200
    for bad in ("", "Bearer", f"Bearer {PRIMARY[:-1]}", f"Basic {PRIMARY}", "Bearer live-secondary-key"):
        resp = httpx.post(f"{server.url}/score", json=small("a", 1), headers={"Authorization": bad})
        assert resp.status_code == 401 and "www-authenticate" in resp.headers, bad
    assert httpx.post(f"{server.url}/score", json=small("a", 1)).status_code == 401
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/").status_code == 200 and httpx.get(f"{server.url}/ready").status_code == 200


@pytest.mark.parametrize(("case", "raw", "expected"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_each_bad_input(server: LiveServer, case: str, raw: bytes, expected: str) -> None:
    resp = httpx.post(f"{server.url}/score", content=raw, headers=server.headers(), timeout=60)
    assert resp.status_code == 400, (case, resp.text)
    assert set(resp.json()) == {"message"} and expected in resp.json()["message"]


def test_limits_413_415_431(server: LiveServer) -> None:
    big = json.dumps(small("x" * 250_000, 1)).encode()
    declared = httpx.post(f"{server.url}/score", content=big, headers=server.headers())
    assert declared.status_code == 413 and "SD_ENDPOINT_MAX_BODY_BYTES" in declared.json()["message"]
    streamed = httpx.post(
        f"{server.url}/score",
        content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
        headers=server.headers(),
    )
    assert streamed.status_code == 413
    plain = httpx.post(f"{server.url}/score", content=b"{}", headers=server.headers(**{"Content-Type": "text/plain"}))
    assert plain.status_code == 415
    too_long = post(server, small("a", 1), **{"x-ms-client-request-id": "c" * 101})
    assert too_long.status_code == 431 and set(too_long.json()) == {"message"}


def test_request_id_headers(server: LiveServer) -> None:
    resp = post(server, small("ids", 1), **{"x-request-id": "live-rid", "x-ms-client-request-id": "live-client"})
    assert resp.headers["x-request-id"] == "live-rid"
    assert resp.headers["x-ms-client-request-id"] == "live-client"
    assert resp.headers["x-ms-request-id"] == "live-client"
    assert float(resp.headers["x-ms-run-fn-exec-ms"]) > 0
    made = httpx.get(f"{server.url}/")
    assert len(made.headers["x-request-id"]) == 36 and made.headers["x-ms-request-id"] == made.headers["x-request-id"]


@pytest.mark.timeout(1800)  # 5 requests, two of 50 steps: minutes on a loaded 2-core machine, not a 408
def test_a_client_written_for_azure_works_unchanged(server: LiveServer) -> None:
    """The azure-contract.md request forms, sent as the Azure samples send them (requests + headers)."""
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {SECONDARY}",
        "azureml-model-deployment": "demo",
    }
    samples: list[dict[str, Any]] = [
        {"input_data": {"columns": ["prompt"], "data": ["a photograph of an astronaut riding a horse"], "index": [0]}},
        {
            "input_data": {
                "columns": ["prompt"],
                "data": ["a photograph of an astronaut riding a horse"],
                "index": [0],
                "parameters": {"num_inference_steps": 50, "guidance_scale": 7.5},
            }
        },
        {
            "input_data": {
                "columns": ["prompt", "negative_prompt"],
                "data": [
                    {"prompt": "a photograph of an astronaut riding a horse", "negative_prompt": "blurry; cartoonish"}
                ],
                "parameters": {"num_inference_steps": 50, "guidance_scale": 7.5},
            }
        },
        {"input_data": {"columns": ["prompt"], "data": [{"prompt": "a horse"}, {"prompt": "a bike"}]}},
        {"input_data": {"columns": ["prompt"], "index": [0], "data": [{"prompt": "an astronaut riding a horse"}]}},
    ]
    for sample in samples:
        response = requests.post(f"{server.url}/score", data=json.dumps(sample), headers=headers, timeout=1200)
        assert response.status_code == 200, response.text
        records = json.loads(response.text)  # what the notebooks do with the invoke() result
        rows = sample["input_data"]["data"]
        assert len(records) == len(rows)
        for record, row in zip(records, rows, strict=True):
            prompt = row if isinstance(row, str) else row["prompt"]
            assert record["prompt"] == prompt
            assert record["nsfw_content_detected"] is None
            image = Image.open(io.BytesIO(base64.b64decode(record["generated_image"])))
            assert image.format == "PNG" and image.size == (64, 64)


@pytest.mark.timeout(1800)  # not about time: every request must be answered, however slow the machine
def test_concurrency_past_the_limits(server: LiveServer) -> None:
    """3 in flight + 1 queued for 100 ms: a burst of 12 gets some 429s; nothing lost, nothing mixed up."""
    n = 12
    barrier = threading.Barrier(n)
    results: dict[int, httpx.Response] = {}

    def send(i: int) -> None:
        body = small(f"burst prompt {i}", 1000 + i, steps=20)  # the burst arrives at once: 429s need no long call
        barrier.wait()
        results[i] = post(server, body, **{"x-request-id": f"burst-{i}"})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(1200)
    assert sorted(results) == list(range(n))  # every request got an answer
    statuses = [results[i].status_code for i in range(n)]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= 3
    for i, resp in results.items():
        assert resp.headers["x-request-id"] == f"burst-{i}"
        if resp.status_code == 429:
            assert int(resp.headers["retry-after"]) >= 1
            continue
        (record,) = resp.json()  # exactly its own one image: none lost, none duplicated
        assert (record["prompt"], record["seed"]) == (f"burst prompt {i}", 1000 + i)
        decode_image(record)


def test_micro_batched_images_equal_solo_ones(server: LiveServer) -> None:
    bodies = [small(f"batched prompt {i}", 500 + i, steps=5) for i in range(3)]
    bodies[1]["parameters"]["num_images_per_prompt"] = 2
    solo = [post(server, b).json() for b in bodies]
    merged_before = _merged_calls(server)
    for _attempt in range(5):  # a burst merges unless the machine is too slow to overlap; retry then
        barrier = threading.Barrier(len(bodies))
        together: dict[int, Any] = {}

        def send(i: int, barrier: threading.Barrier = barrier, together: dict[int, Any] = together) -> None:
            barrier.wait()
            together[i] = post(server, bodies[i]).json()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(1200)
        for i, records in together.items():
            assert [r["seed"] for r in records] == [r["seed"] for r in solo[i]]
            for got, alone in zip(records, solo[i], strict=True):
                a = np.asarray(decode_image(got), np.int16)
                b = np.asarray(decode_image(alone), np.int16)
                assert np.abs(a - b).max() <= 1
        if _merged_calls(server) > merged_before:
            break
    assert _merged_calls(server) > merged_before, "no burst was merged into one pipeline call"


def _merged_calls(server: LiveServer) -> float:
    metrics = server.metrics()
    return metrics["sd_batch_size_requests_count"] - metrics['sd_batch_size_requests_bucket{le="1.0"}']


def test_one_json_log_line_per_request(server: LiveServer) -> None:
    post(server, small("a very private prompt", 9), **{"x-request-id": "json-log-1"})
    deadline = time.monotonic() + 30
    line: dict[str, Any] | None = None
    while line is None and time.monotonic() < deadline:
        for raw in server.logs().splitlines():
            if raw.startswith("{"):
                record = json.loads(raw)
                if record.get("request_id") == "json-log-1" and record.get("logger") == "sd_endpoint.access":
                    line = record
        time.sleep(0.1)
    assert line is not None
    assert (line["status"], line["images"], line["steps"], line["path"]) == (200, 1, 3, "/score")
    assert {"queue", "generate", "encode"} <= set(line["timings_ms"])
    logs = server.logs()
    assert "a very private prompt" not in logs
    assert PRIMARY not in logs and SECONDARY not in logs
    assert "Model loaded" in logs and "Warm-up done" in logs
