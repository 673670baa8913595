"""score.py under the real azmlinfsrv process, screening through the emulator: the Azure deployment path."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from sd_endpoint.safety.emulator import AacsEmulator
from tests.conftest import small_request
from tests.safety.conftest import KEY, POLICY

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"azmlinfsrv exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass  # init() is still loading the model
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.mark.slow
def test_screening_through_score_py(tiny_model_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    with AacsEmulator(POLICY, key=KEY) as emulator:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CONTENT_SAFETY_")},
            "AZUREML_MODEL_DIR": str(tiny_model_dir.parent),
            "SD_ENDPOINT_DEVICE": "cpu",
            "SD_ENDPOINT_DTYPE": "float32",
            "SD_ENDPOINT_CACHE_DIR": str(cache_dir),
            "AML_APP_ROOT": str(REPO),
            "WORKER_COUNT": "1",
            **emulator.env(),
            "CONTENT_SAFETY_RETRIES": "0",
        }
        exe = shutil.which("azmlinfsrv", path=str(Path(sys.executable).parent)) or "azmlinfsrv"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [exe, "--entry_script", str(REPO / "score.py"), "--port", str(port)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                wait_until_up(f"http://127.0.0.1:{port}/", proc)
                url = f"http://127.0.0.1:{port}/score"

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
            except BaseException:
                sys.stderr.write(log_path.read_text(errors="replace")[-5000:])
                raise
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=20)
    server_log = log_path.read_text(errors="replace")
    assert "Content screening on" in server_log  # the start-up line with endpoint, auth and thresholds
    assert KEY not in server_log and "hexathorn" not in server_log  # neither the key nor prompts are logged
