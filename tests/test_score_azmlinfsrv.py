"""score.py under the real Azure ML inference server (azmlinfsrv), on loopback, with the tiny model."""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.support.servers import ScoreServer

MODEL_CARD_SAMPLE = {
    "input_data": {
        "columns": ["prompt"],
        "data": ["a photograph of an astronaut riding a horse"],
        "index": [0],
        "parameters": {"num_inference_steps": 50, "guidance_scale": 7.5},
    }
}


@pytest.fixture(scope="module")
def azmlinfsrv(tiny_model_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {
        "AZUREML_MODEL_DIR": str(tiny_model_dir.parent),  # found one level down, as on Azure
        "SD_ENDPOINT_DEVICE": "cpu",
        "SD_ENDPOINT_DTYPE": "float32",
        "SD_ENDPOINT_CACHE_DIR": str(cache_dir),
        "SD_ENDPOINT_MAX_IMAGES_PER_REQUEST": "4",
        "WORKER_COUNT": "2",  # as Azure's samples deploy it: two workers, each with its own model
        # 768x768 x 50 steps took over 85 s on a loaded machine: no test here is about timeouts.
        "SD_ENDPOINT_REQUEST_TIMEOUT_MS": "600000",
    }
    server = ScoreServer(env, tmp_path_factory.mktemp("azmlinfsrv") / "server.log")
    server.env.pop("OMP_NUM_THREADS", None)  # the share below is ours, not a user's setting
    with server:
        yield server.url
    server_log = server.logs()
    assert "astronaut" not in server_log  # prompts stay out of the logs by default
    # Each worker takes its share of the cores, not every core (OpenMP threads of two workers would fight).
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert server_log.count(f"CPU: {share} intra-op thread(s) for this worker (2 workers share") == 2, server_log
    # Quiet start-up: no third-party notices, and one line per event (each worker warms up once).
    for notice in ("requires torchvision", "Writing model shards", "Setting accelerator to CPU", "Failed to load"):
        assert notice not in server_log
    assert server_log.count("Warm-up done in") == 2


pytestmark = pytest.mark.slow


@pytest.mark.timeout(1800)  # the first test pays for two workers' start-up: minutes on a loaded machine
def test_liveness(azmlinfsrv: str) -> None:
    r = requests.get(f"{azmlinfsrv}/", timeout=10)
    assert r.status_code == 200 and "Healthy" in r.text


@pytest.mark.timeout(1800)  # 768x768, 50 steps: over 85 s on a loaded 2-core machine; not about time
def test_model_card_sample(azmlinfsrv: str) -> None:
    r = requests.post(f"{azmlinfsrv}/score", json=MODEL_CARD_SAMPLE, headers={"x-request-id": "req-123"}, timeout=600)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "req-123"
    assert float(r.headers["x-ms-run-fn-exec-ms"]) > 0
    (record,) = r.json()
    assert record["prompt"] == "a photograph of an astronaut riding a horse"
    assert record["nsfw_content_detected"] is None
    assert record["index"] == 0 and isinstance(record["seed"], int)
    image = Image.open(io.BytesIO(base64.b64decode(record["generated_image"])))
    assert image.format == "PNG" and image.size == (768, 768)


def test_row_objects_and_seed_reproduce(azmlinfsrv: str) -> None:
    body = {
        "input_data": {
            "columns": ["prompt", "negative_prompt"],
            "data": [{"prompt": "a horse", "negative_prompt": "blurry"}, {"prompt": "a bike"}],
        },
        "parameters": {"num_inference_steps": 3, "height": 64, "width": 64, "seed": 5},
    }
    first = requests.post(f"{azmlinfsrv}/score", json=body, timeout=60).json()
    again = requests.post(f"{azmlinfsrv}/score", json=body, timeout=60).json()
    assert [r["prompt"] for r in first] == ["a horse", "a bike"]
    assert first == again


@pytest.mark.parametrize(
    ("data", "headers", "status", "fragment"),
    [
        (b"{not json", {}, 400, "not valid JSON"),
        (b"[1, 2]", {}, 400, "must be a JSON object"),
        (b'{"input_data": {"data": []}}', {}, 400, "at least one row"),
        (b'{"input_data": {"data": ["a"]}, "parameters": {"guidence_scale": 3}}', {}, 400, "unknown field"),
        (b'{"input_data": {"data": ["a","b","c","d","e"]}}', {}, 400, "the limit is 4"),
        (b'{"input_data": {"data": ["a"]}, "parameters": {"height": 100}}', {}, 400, "multiple of 8"),
        (b'{"input_data": {"data": ["a"]}}', {"Content-Type": "text/plain"}, 415, "application/json"),
    ],
)
def test_bad_requests_get_4xx_with_message(
    azmlinfsrv: str, data: bytes, headers: dict[str, str], status: int, fragment: str
) -> None:
    r = requests.post(
        f"{azmlinfsrv}/score", data=data, headers={"Content-Type": "application/json", **headers}, timeout=30
    )
    assert r.status_code == status, r.text
    assert fragment in r.json()["message"]
    assert r.headers["x-ms-run-function-failed"] == "False"


def test_azure_client_flows(azmlinfsrv: str, tmp_path: Path) -> None:
    """The client code of Azure's online samples, in our words, against the live server.

    ``az ml online-endpoint invoke -o json > file`` stores the response body as a JSON string, so the CLI sample
    reads the file with json.load, then json.loads, then decodes each base64 image and saves it as a JPEG;
    ``ml_client.online_endpoints.invoke`` returns the body as text, which the SDK notebooks json.loads.
    """
    body = {
        "input_data": {"columns": ["prompt"], "index": [0], "data": [{"prompt": "a photograph of a horse"}]},
        "parameters": {"num_inference_steps": 3, "height": 64, "width": 64},
    }
    r = requests.post(f"{azmlinfsrv}/score", json=body, timeout=60)
    assert r.status_code == 200, r.text

    saved = tmp_path / "response.json"
    saved.write_text(json.dumps(r.text), encoding="utf-8")  # what `az ml ... invoke -o json` writes
    with saved.open(encoding="utf-8") as fh:
        records = json.loads(json.load(fh))
    for i, record in enumerate(records):
        image = Image.open(io.BytesIO(base64.b64decode(record["generated_image"])))
        out = tmp_path / f"Img_{i}_{record['prompt'][:50].replace(' ', '_')}.jpg"
        image.convert("RGB").save(out, "JPEG")
        assert Image.open(out).size == (64, 64)
    assert [rec["prompt"] for rec in records] == ["a photograph of a horse"]

    response = r.text  # ml_client.online_endpoints.invoke(...) returns this string
    generations = json.loads(response)
    assert len(generations) == 1 and generations[0]["nsfw_content_detected"] is None
    assert Image.open(io.BytesIO(base64.b64decode(generations[0]["generated_image"]))).format == "PNG"


def test_get_on_score_is_405(azmlinfsrv: str) -> None:
    r = requests.get(f"{azmlinfsrv}/score", timeout=10)
    assert r.status_code == 405
    assert "POST" in r.json()["message"]


def test_long_request_id_is_431(azmlinfsrv: str) -> None:
    r = requests.post(f"{azmlinfsrv}/score", json=MODEL_CARD_SAMPLE, headers={"x-request-id": "x" * 101}, timeout=10)
    assert r.status_code == 431
