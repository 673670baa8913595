"""score.py under the real azmlinfsrv process, screening through the emulator: the Azure deployment path."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import requests

from aacs_emulator import AacsEmulator
from tests.conftest import small_request
from tests.safety.conftest import KEY, POLICY
from tests.support.servers import ScoreServer


@pytest.mark.slow
def test_screening_through_score_py(tiny_model_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    with AacsEmulator(POLICY, key=KEY) as emulator:
        env = {
            "AZUREML_MODEL_DIR": str(tiny_model_dir.parent),
            "SD_ENDPOINT_DEVICE": "cpu",
            "SD_ENDPOINT_DTYPE": "float32",
            "SD_ENDPOINT_CACHE_DIR": str(cache_dir),
            **emulator.env(),
            "CONTENT_SAFETY_RETRIES": "0",
        }
        with ScoreServer(env, log_path) as server:
            url = f"{server.url}/score"

            # A blocked prompt row and a passing row in one request: 200, per-row outcomes.
            r = requests.post(url, json=small_request(["a quiet harbour", "a hexathorn crowd"]), timeout=120)
            assert r.status_code == 200, r.text
            assert r.headers["x-content-safety"] == "screened"
            passing, blocked = r.json()
            assert passing["nsfw_content_detected"] is False
            assert base64.b64decode(passing["generated_image"]).startswith(b"\x89PNG")
            assert blocked["nsfw_content_detected"] is True and blocked["generated_image"] == ""
            assert blocked["blocked"] == {"stage": "prompt", "categories": {"Hate": 4}}
            assert {r.auth for r in emulator.requests} == {"key"}

            # The service fails: 503 with a message, nothing unscreened.
            emulator.set_fault("500")
            r = requests.post(url, json=small_request(["a quiet harbour"]), timeout=120)
            assert r.status_code == 503, r.text
            assert r.json()["message"].startswith("Content screening is unavailable")
            assert "generated_image" not in r.text
    server_log = log_path.read_text(errors="replace")
    assert "Content screening on" in server_log  # the start-up line with endpoint, auth and thresholds
    assert KEY not in server_log and "hexathorn" not in server_log  # neither the key nor prompts are logged
