"""Test doubles and process helpers for the server tests.

``FakeBackend`` stands in for the model in tests of the layers above it (server, batching): each image is
a solid colour computed from its seed and prompt, so a test can tell whose image it got. ``LiveServer``
runs the real ``sd-endpoint serve`` in a subprocess on a free loopback port.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask, StepCallback

REPO = Path(__file__).resolve().parents[2]
SD_ENDPOINT = Path(sys.executable).with_name("sd-endpoint")


def colour_of(prompt: str, seed: int) -> tuple[int, int, int]:
    """The colour FakeBackend paints for (prompt, seed)."""
    return (seed % 256, sum(prompt.encode()) % 256, 7)


class FakeBackend:
    """A Backend whose images tell which task made them; counts steps and calls; can block or fail."""

    name = "fake"

    def __init__(self, *, step_seconds: float = 0.0, fail_on: str = "boom") -> None:
        self.step_seconds = step_seconds
        self.fail_on = fail_on
        self.calls: list[tuple[GenerationSpec, list[ImageTask]]] = []
        self.steps_run = 0
        self.gate = threading.Event()
        self.gate.set()  # clear it to hold every call at its start
        self.entered = threading.Event()  # set when a call starts
        self._lock = threading.Lock()

    @property
    def native_size(self) -> tuple[int, int]:
        return (64, 64)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": "cpu", "dtype": "float32", "placement": "test double"}

    def prompt_overflows(self, text: str) -> bool:
        return False

    def supports(self, spec: GenerationSpec) -> bool:
        return True

    def generate(
        self,
        spec: GenerationSpec,
        tasks: Sequence[ImageTask],
        cancel: CancelToken | None = None,
        on_step: StepCallback | None = None,
    ) -> BatchResult:
        with self._lock:
            self.calls.append((spec, list(tasks)))
        self.entered.set()
        self.gate.wait(30)
        if cancel is not None:
            cancel.check()
        if any(self.fail_on in t.prompt for t in tasks):
            raise RuntimeError(f"{self.fail_on}: this prompt always fails")
        started = time.perf_counter()
        steps = 0
        for _ in range(spec.steps):
            if self.step_seconds:
                time.sleep(self.step_seconds)
            steps += 1
            with self._lock:
                self.steps_run += 1
            if cancel is not None:
                cancel.steps_done = steps
                cancel.check()
        images = [Image.new("RGB", (spec.width, spec.height), colour_of(t.prompt, t.seed)) for t in tasks]
        return BatchResult(images, steps, time.perf_counter() - started, [[] for _ in tasks])


def decode_image(record: dict[str, Any]) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(record["generated_image"], validate=True)))
    image.load()
    return image


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{label="v",...}': value} (labels sorted)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


class LiveServer:
    """``sd-endpoint serve`` in a subprocess on 127.0.0.1, with the given SD_ENDPOINT_* environment."""

    def __init__(self, env: dict[str, str], log_path: Path, *, args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.key: str | None = None

    def start(self, *, wait_ready: bool = True, timeout: float = 240.0) -> LiveServer:
        cmd = [str(SD_ENDPOINT), "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.logs()[-4000:]}")

    def headers(self, **extra: str) -> dict[str, str]:
        out = {"Content-Type": "application/json", **extra}
        if self.key:
            out["Authorization"] = f"Bearer {self.key}"
        return out

    def metrics(self) -> dict[str, float]:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        resp = httpx.get(f"{self.url}/metrics", headers=headers, timeout=30)
        resp.raise_for_status()
        return parse_metrics(resp.text)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return int(self.proc.returncode)


def model_env(model_dir: Path, cache_dir: Path, **settings: object) -> dict[str, str]:
    """SD_ENDPOINT_* for the tiny model on CPU fp32, plus ``settings`` (field name -> value)."""
    env = {
        "SD_ENDPOINT_MODEL": str(model_dir),
        "SD_ENDPOINT_DEVICE": "cpu",
        "SD_ENDPOINT_DTYPE": "float32",
        "SD_ENDPOINT_CACHE_DIR": str(cache_dir),
    }
    env.update({f"SD_ENDPOINT_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def _body(parameters: dict[str, Any] | None = None, **input_data: Any) -> bytes:
    data: dict[str, Any] = {"columns": ["prompt"], "data": ["a cat"], **input_data}
    body: dict[str, Any] = {"input_data": data}
    if parameters is not None:
        body["parameters"] = parameters
    return json.dumps(body).encode()


# Every bad input of the core issue: (case, raw body, text the 400 message must contain).
BAD_INPUTS: list[tuple[str, bytes, str]] = [
    ("malformed JSON", b'{"input_data": {"columns": ["prompt"], "data": ["a cat"]', "not valid JSON"),
    ("empty body", b"", "empty"),
    ("non-UTF-8", b'{"input_data": {"columns": ["prompt"], "data": ["caf\xe9"]}}', "UTF-8"),
    ("JSON array", b'[{"prompt": "a cat"}]', "JSON object"),
    ("missing input_data", b'{"data": ["a cat"]}', "input_data"),
    ("missing prompt column", _body(columns=["negative_prompt"], data=[["blurry"]]), "prompt"),
    ("row without prompt", _body(columns=["prompt", "negative_prompt"], data=[{"negative_prompt": "x"}]), "prompt"),
    ("index/data length mismatch", _body(index=[0, 1]), "input_data.index"),
    ("empty data", _body(data=[]), "input_data.data"),
    ("data not a list", _body(data="a cat"), "input_data.data"),
    ("prompt not a string", _body(data=[42]), "input_data.data[0]"),
    ("steps of the wrong type", _body({"num_inference_steps": "ten"}), "num_inference_steps"),
    ("steps as a boolean", _body({"num_inference_steps": True}), "num_inference_steps"),
    ("steps out of range", _body({"num_inference_steps": 1000}), "num_inference_steps"),
    (
        "guidance NaN",
        b'{"input_data": {"columns": ["prompt"], "data": ["a"]}, "parameters": {"guidance_scale": NaN}}',
        "NaN",
    ),
    ("guidance Infinity", _body({"guidance_scale": 1e309}), "Infinity"),
    ("guidance out of range", _body({"guidance_scale": 51}), "guidance_scale"),
    ("height not a multiple of 8", _body({"height": 100}), "multiple of 8"),
    ("width too small", _body({"width": 32}), "width"),
    ("too many pixels", _body({"height": 2048, "width": 2048}), "SD_ENDPOINT_MAX_PIXELS"),
    ("unknown scheduler", _body({"scheduler": "k_fancy"}), "scheduler"),
    ("unknown parameter", _body({"guidence_scale": 7.5}), "guidence_scale"),
    ("unknown top-level key", b'{"input_data": {"columns": ["prompt"], "data": ["a"]}, "extra": 1}', "extra"),
    ("too many images", _body({"num_images_per_prompt": 3}, data=["a", "b", "c"]), "MAX_IMAGES_PER_REQUEST"),
    ("negative seed", _body({"seed": -1}), "seed"),
    ("blank prompt", _body(data=["   "]), "prompt"),
    ("100 kB prompt", _body(data=["x" * 100_000]), "20000 characters"),
]
