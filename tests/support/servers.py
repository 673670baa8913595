"""The real servers in subprocesses on a free loopback port: ``sd-endpoint serve`` (``LiveServer``) and
score.py under Azure's inference server (``ScoreServer``). Each writes its output to ``log_path``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.net import free_port, wait_until_up

REPO = Path(__file__).resolve().parents[2]
SD_ENDPOINT = Path(sys.executable).with_name("sd-endpoint")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{label="v",...}': value} (labels sorted)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def model_env(model_dir: Path, cache_dir: Path, **settings: object) -> dict[str, str]:
    """SD_ENDPOINT_* for a model folder on CPU fp32, plus ``settings`` (field name -> value)."""
    env = {
        "SD_ENDPOINT_MODEL": str(model_dir),
        "SD_ENDPOINT_DEVICE": "cpu",
        "SD_ENDPOINT_DTYPE": "float32",
        "SD_ENDPOINT_CACHE_DIR": str(cache_dir),
    }
    env.update({f"SD_ENDPOINT_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class ServerProcess:
    """A server process on 127.0.0.1 with this process's environment plus ``env``.

    CONTENT_SAFETY_* is not inherited (a developer's own screening settings would change what the tests see);
    pass it in ``env`` to screen. As a context manager it starts, and on an error prints the log's tail.
    """

    ready_path = "/"

    def __init__(self, env: Mapping[str, str], log_path: Path, *, args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("CONTENT_SAFETY_")}
        self.env = {**inherited, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, *, wait_ready: bool = True, timeout: float = 900.0) -> Self:  # a loaded machine is slow
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        wait_until_up(self.url + self.ready_path, self.proc, timeout=timeout, logs=self.logs)

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

    @contextmanager
    def serving(self) -> Iterator[Self]:
        """Started and ready; at the end stopped, which must be a clean exit (status 0)."""
        self.start()
        try:
            yield self
        finally:
            code = self.stop()
            assert code == 0, self.logs()[-3000:]

    def __enter__(self) -> Self:
        return self.start() if self.proc is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            sys.stderr.write(self.logs()[-5000:])
        self.stop()


class LiveServer(ServerProcess):
    """``sd-endpoint serve``; ``key`` (if set) goes into ``headers()`` and ``metrics()``."""

    ready_path = "/ready"

    def __init__(
        self, env: Mapping[str, str], log_path: Path, *, args: Sequence[str] = (), key: str | None = None
    ) -> None:
        super().__init__(env, log_path, args=args)
        self.key = key

    def command(self) -> list[str]:
        return [str(SD_ENDPOINT), "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args]

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


class ScoreServer(ServerProcess):
    """score.py under ``azmlinfsrv`` (Azure ML's inference server), one worker, app root = the repository."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, args: Sequence[str] = ()) -> None:
        super().__init__({"AML_APP_ROOT": str(REPO), "WORKER_COUNT": "1", **env}, log_path, args=args)

    def command(self) -> list[str]:
        exe = shutil.which("azmlinfsrv", path=str(Path(sys.executable).parent)) or "azmlinfsrv"
        return [exe, "--entry_script", str(REPO / "score.py"), "--port", str(self.port), *self.args]
