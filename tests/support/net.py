"""Loopback ports and waiting for a server process to answer."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(
    url: str,
    proc: subprocess.Popen[bytes] | None = None,
    *,
    timeout: float = 240.0,
    logs: Callable[[], str] = lambda: "",
) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits. Errors end with the tail of ``logs()``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{logs()[-4000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass  # still starting (loading the model)
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s:\n{logs()[-4000:]}")
