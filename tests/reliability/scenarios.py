"""Reliability scenarios against the real app and uvicorn on loopback, shared by tests/reliability/ (small
counts, assertions) and benchmarks/reliability.py (larger counts, the README table).

The model is ``FakeBackend`` (these are the layers above it: HTTP edge, admission, batching, the worker,
screening); every scenario returns the figures it measured and raises AssertionError when an answer breaks
the rules: only the statuses allowed, JSON error bodies, exactly one answer per request, each image its own.
No pytest import here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import string
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sd_endpoint.server import create_app
from sd_endpoint.server.app import uvicorn_config
from sd_endpoint.service import GenerationService
from sd_endpoint.settings import Settings, load_settings
from tests.support.fakes import FakeBackend
from tests.support.net import free_port
from tests.support.servers import parse_metrics

# ------------------------------------------------------------------------------------------------
# The server under test


@dataclass
class FakeServer:
    """``create_app`` + the production uvicorn config, served from a thread on 127.0.0.1."""

    backend: FakeBackend
    settings: Settings
    screener: Any = None
    url: str = ""
    _server: Any = None
    _thread: threading.Thread | None = None

    def start(self) -> FakeServer:
        import uvicorn

        service = GenerationService(self.settings, self.backend, self.screener)
        app = create_app(self.settings, service, on_fatal=lambda: None)
        self.app = app
        config = uvicorn_config(app, self.settings)
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # not the main thread
        self._thread = threading.Thread(target=self._server.run, name="uvicorn", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self.settings.port}"
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("the in-thread server never became ready")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=30).text)


@contextlib.contextmanager
def fake_server(backend: FakeBackend | None = None, screener: Any = None, **overrides: Any) -> Iterator[FakeServer]:
    base: dict[str, Any] = {
        "device": "cpu",
        "dtype": "float32",
        "default_steps": 2,
        "port": free_port(),
        "request_timeout_ms": 120_000,
    }
    server = FakeServer(backend or FakeBackend(), load_settings(**{**base, **overrides}), screener).start()
    try:
        yield server
    finally:
        server.stop()


def check_answer(resp: httpx.Response | requests.Response) -> None:
    """2xx/4xx only; an error is a JSON object with a message ({"error": {"message"}} on OpenAI's routes)."""
    assert resp.status_code < 500, f"{resp.status_code}: {resp.text[:500]}"
    if resp.status_code >= 400:
        assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
        error = resp.json()
        message = error.get("error", {}).get("message") if "/v1/" in str(resp.request.url) else error.get("message")
        assert isinstance(message, str) and message, resp.text[:500]


# ------------------------------------------------------------------------------------------------
# Fuzzing: hypothesis over /score, schemathesis over /openapi.json

_ANY_CHAR = st.characters(codec=None, exclude_categories=())  # lone surrogates included
_JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_ANY_CHAR, max_size=40)
)
_JSON = st.recursive(
    _JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(_ANY_CHAR, max_size=12), inner, max_size=4),
    max_leaves=20,
)
_PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "num_inference_steps": st.integers(-2, 4) | _JSON_LEAVES,
        "guidance_scale": st.floats(-1, 60, allow_nan=False) | _JSON_LEAVES,
        "height": st.sampled_from([0, 8, 63, 64, 72, 100, 128]) | _JSON_LEAVES,
        "width": st.sampled_from([0, 8, 63, 64, 72, 100, 128]) | _JSON_LEAVES,
        "num_images_per_prompt": st.integers(-1, 10),
        "seed": st.integers(-5, 2**64) | _JSON_LEAVES,
        "scheduler": st.sampled_from(["ddim", "euler", "pndm", "nope"]) | _JSON_LEAVES,
        "output_format": st.sampled_from(["png", "jpeg", "webp", "gif"]),
        "negative_prompt": st.text(_ANY_CHAR, max_size=30) | _JSON_LEAVES,
        "eta": st.floats(-1, 2, allow_nan=False),
        "strength": st.floats(-1, 2, allow_nan=False),
    },
)
_ROW = st.text(_ANY_CHAR, max_size=60) | st.lists(_JSON_LEAVES, max_size=4) | _JSON
_SHAPED = st.builds(
    lambda columns, data, index, params, where: {
        "input_data": {
            **({"columns": columns} if columns is not None else {}),
            "data": data,
            **({"index": index} if index is not None else {}),
            **({"parameters": params} if where == "inner" else {}),
        },
        **({"parameters": params} if where == "outer" else {}),
    },
    st.none() | st.lists(st.sampled_from(["prompt", "negative_prompt", "seed", "image", "x"]), max_size=4),
    st.lists(_ROW, max_size=4) | _JSON,
    st.none() | st.lists(st.integers() | st.text(_ANY_CHAR, max_size=8), max_size=4),
    _PARAMS,
    st.sampled_from(["inner", "outer", "none"]),
)


def _encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode()  # \ud800 stays an escape, as a client sends it


_VALID = st.builds(
    lambda prompts, negative, steps, seed, images, fmt: {
        "input_data": {"columns": ["prompt"], "data": prompts, "index": list(range(len(prompts)))},
        "parameters": {
            "num_inference_steps": steps,
            "height": 64,
            "width": 64,
            "seed": seed,
            "num_images_per_prompt": images,
            "output_format": fmt,
            **({"negative_prompt": negative} if negative is not None else {}),
        },
    },
    st.lists(st.text(_ANY_CHAR, min_size=1, max_size=40), min_size=1, max_size=3),
    st.none() | st.text(_ANY_CHAR, max_size=20),
    st.integers(1, 3),
    st.integers(0, 2**63 - 1),
    st.integers(1, 2),
    st.sampled_from(["png", "jpeg", "webp"]),
)
_DEEP = st.integers(1, 5000).map(lambda n: ("[" * n + "]" * n).encode())
BODIES = (
    _VALID.map(_encode)
    | _SHAPED.map(_encode)
    | _JSON.map(_encode)
    | st.binary(max_size=200)
    | _DEEP
    | st.text(string.printable, max_size=80).map(str.encode)
)


@dataclass
class Fuzzed:
    tried: int = 0
    statuses: Counter[int] = field(default_factory=Counter)


def fuzz_score(url: str, examples: int, *, seed: int = 0) -> Fuzzed:
    """Hypothesis-generated bodies (structure, types, numbers, unicode, nesting, sizes) to POST /score."""
    out = Fuzzed()
    client = httpx.Client(timeout=120)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(body=BODIES)
    def one(body: bytes) -> None:
        resp = client.post(f"{url}/score", content=body, headers={"Content-Type": "application/json"})
        out.tried += 1
        out.statuses[resp.status_code] += 1
        check_answer(resp)

    try:
        one()
    finally:
        client.close()
    return out


def fuzz_openapi(url: str, examples_per_operation: int) -> Fuzzed:
    """schemathesis over /openapi.json: every operation, every answer 2xx/4xx (JSON where it is an error)."""
    import schemathesis

    out = Fuzzed()
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=examples_per_operation,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def one(case: Any) -> None:
            kwargs = case.as_transport_kwargs(base_url=url)  # requests' keyword arguments
            try:
                resp = session.request(**kwargs, timeout=120)
            except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeEncodeError):
                out.statuses[0] += 1  # the client refused to send it (e.g. an empty "Bearer " header)
                return
            out.tried += 1
            out.statuses[resp.status_code] += 1
            check_answer(resp)

        one()
    session.close()
    return out


# ------------------------------------------------------------------------------------------------
# Load past capacity


@dataclass
class Load:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    seconds: float = 0.0
    metrics_match: bool = False


def body(prompt: str, seed: int, index: int | str, steps: int = 2) -> dict[str, Any]:
    return {
        "input_data": {"columns": ["prompt"], "data": [prompt], "index": [index]},
        "parameters": {"num_inference_steps": steps, "height": 64, "width": 64, "seed": seed},
    }


def load_past_capacity(server: FakeServer, requests: int, concurrency: int) -> Load:
    """``requests`` at ``concurrency`` (well past admission's capacity): exactly one answer each, only
    200/429/408, every 200 carries its own prompt/seed/index, and /metrics counted exactly what was sent."""
    out = Load(sent=requests)
    before = server.metrics()

    async def run() -> None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            gate = asyncio.Semaphore(concurrency)
            answers: dict[int, httpx.Response] = {}

            async def one(i: int) -> None:
                async with gate:
                    answers[i] = await client.post(
                        f"{server.url}/score", json=body(f"load prompt {i}", 5000 + i, f"row-{i}")
                    )

            await asyncio.gather(*(one(i) for i in range(requests)))
            assert sorted(answers) == list(range(requests))  # exactly one answer each
            for i, resp in answers.items():
                out.statuses[resp.status_code] += 1
                assert resp.status_code in (200, 429, 408), (resp.status_code, resp.text[:300])
                if resp.status_code == 200:
                    (record,) = resp.json()
                    assert (record["prompt"], record["seed"], record["index"]) == (
                        f"load prompt {i}",
                        5000 + i,
                        f"row-{i}",
                    )
                else:
                    assert int(resp.headers.get("retry-after", "1")) >= 1

    started = time.perf_counter()
    asyncio.run(run())
    out.seconds = time.perf_counter() - started
    after = server.metrics()
    for status, count in out.statuses.items():
        key = f'sd_requests_total{{route="/score",status="{status}"}}'
        assert after.get(key, 0) - before.get(key, 0) == count, (key, after.get(key), before.get(key), count)
    out.metrics_match = True
    return out


# ------------------------------------------------------------------------------------------------
# Soak


@dataclass
class Soak:
    requests: int = 0
    rss_mb: tuple[float, float] = (0.0, 0.0)
    fds: tuple[int, int] = (0, 0)
    threads: tuple[int, int] = (0, 0)
    rss_slope_kb_per_1k: float = 0.0


def soak(server: FakeServer, requests: int, concurrency: int = 4) -> Soak:
    """Many tiny requests; RSS, open fds and threads sampled as they go (the first 20% is warm-up)."""
    import psutil

    proc = psutil.Process(os.getpid())
    samples: list[tuple[int, float, int, int]] = []

    async def run() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            gate = asyncio.Semaphore(concurrency)

            async def one(i: int) -> None:
                async with gate:
                    resp = await client.post(f"{server.url}/score", json=body(f"soak {i % 50}", i, i, steps=1))
                    assert resp.status_code in (200, 429), resp.text[:300]
                if i % max(1, requests // 20) == 0:
                    samples.append((i, proc.memory_info().rss / 2**20, proc.num_fds(), proc.num_threads()))

            await asyncio.gather(*(one(i) for i in range(requests)))

    asyncio.run(run())
    samples.sort()
    steady = samples[len(samples) // 5 :] or samples
    out = Soak(requests=requests)
    out.rss_mb = (steady[0][1], steady[-1][1])
    out.fds = (steady[0][2], steady[-1][2])
    out.threads = (steady[0][3], steady[-1][3])
    out.rss_slope_kb_per_1k = _slope([(s[0], s[1] * 1024) for s in steady]) * 1000
    return out


def _slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    den = sum((p[0] - mx) ** 2 for p in points)
    return 0.0 if den == 0 else sum((p[0] - mx) * (p[1] - my) for p in points) / den


# ------------------------------------------------------------------------------------------------
# Faults


def bad_member_in_merged_calls(server: FakeServer, rounds: int) -> Counter[str]:
    """Each round: one request whose prompt makes the backend raise, merged with healthy ones. Only the
    faulty one fails (500); the healthy ones get their own images, each generated in one call, never twice."""
    backend = server.backend
    out: Counter[str] = Counter()

    async def run() -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            for r in range(rounds):
                backend.gate.clear()
                backend.entered.clear()
                blocker = asyncio.ensure_future(client.post(f"{server.url}/score", json=body(f"hold {r}", r, 0)))
                while not backend.entered.is_set():
                    await asyncio.sleep(0.005)
                prompts = [f"good {r} a", f"boom {r}", f"good {r} b"]
                answers = [
                    asyncio.ensure_future(client.post(f"{server.url}/score", json=body(p, r, 0))) for p in prompts
                ]
                while server.app.state.sd.batcher.queued < len(prompts):
                    await asyncio.sleep(0.005)
                backend.gate.set()
                assert (await blocker).status_code == 200
                for prompt, task in zip(prompts, answers, strict=True):
                    resp = await task
                    if prompt.startswith("boom"):
                        assert resp.status_code == 500 and "request id" in resp.json()["message"]
                        out["failed alone"] += 1
                    else:
                        assert resp.status_code == 200 and resp.json()[0]["prompt"] == prompt
                        out["batch-mates answered"] += 1
                alone = [t for _, t in backend.calls if len(t) == 1 and t[0].prompt in prompts]
                assert len(alone) == 3  # after the merged call failed: each once, alone

    asyncio.run(run())
    return out


def disconnects(server: FakeServer, clients: int) -> Counter[str]:
    """Clients that close their connection mid-generation: each generation stops, every slot comes back."""
    out: Counter[str] = Counter()
    backend = server.backend
    payload = json.dumps(body("leaving", 1, 0, steps=150)).encode()
    backend.step_seconds = 0.02
    try:
        for _ in range(clients):
            before = backend.steps_run
            with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=30) as sock:
                sock.sendall(
                    b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                end = time.monotonic() + 30
                while backend.steps_run - before < 3 and time.monotonic() < end:
                    time.sleep(0.01)
            stopped_at = backend.steps_run
            time.sleep(0.3)
            assert backend.steps_run - stopped_at <= 2, "the generation went on after the client left"
            out["stopped"] += 1
        m = server.metrics()
        assert m.get("sd_requests_in_flight", 0) == 0 and m.get("sd_requests_queued", 0) == 0
        resp = httpx.post(f"{server.url}/score", json=body("after", 1, 0), timeout=60)
        assert resp.status_code == 200
    finally:
        backend.step_seconds = 0.0
    return out


def slow_bodies(server: FakeServer, connections: int, read_timeout_s: float) -> Counter[str]:
    """Connections that declare a body and never send it are closed after the body read timeout."""
    out: Counter[str] = Counter()
    port = int(server.url.rsplit(":", 1)[1])
    socks = []
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        socks.append(s)
    started = time.monotonic()
    for s in socks:
        s.settimeout(read_timeout_s + 30)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data and b"}" in data:
                    break
        s.close()
        status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"
        out[status] += 1
    out["seconds"] = round(time.monotonic() - started)
    assert set(out) <= {"408", "closed", "seconds"}, out
    assert time.monotonic() - started < read_timeout_s + 30
    resp = httpx.post(f"{server.url}/score", json=body("after", 1, 0), timeout=60)
    assert resp.status_code == 200
    return out


MALFORMED_HTTP = {
    # The app already runs for this one and never reads the body: its own answer must not become a 500.
    "bad chunk, body ignored": b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "bad Content-Length": b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "bad chunk size": b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "NUL in a header": b"GET / HTTP/1.1\r\nHost: x\r\nX-Note: a\x00b\r\n\r\n",
    "HTTP/1.1 without Host": b"GET / HTTP/1.1\r\n\r\n",
    "not a request line": b"HELLO THERE\r\n\r\n",
}


def _raw_exchange(port: int, request: bytes, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes; (status, lower-cased headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 ") and len(lines[0].split(" ", 2)[2]) > 0, data[:200]  # with a reason
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split(" ", 2)[1]), headers, payload


def _check_json_error(status: int, headers: dict[str, str], payload: bytes) -> str:
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, payload)
    message = json.loads(payload)["message"]
    assert isinstance(message, str) and message
    return message


def malformed_http(server: FakeServer) -> Counter[str]:
    """Requests uvicorn's parser refuses before the app runs: each a 400 with a JSON message, connection closed,
    and the server still serving afterwards."""
    out: Counter[str] = Counter()
    port = int(server.url.rsplit(":", 1)[1])
    before = server.metrics()
    for name, request in MALFORMED_HTTP.items():
        status, headers, payload = _raw_exchange(port, request)
        assert status == 400, (name, status, payload)
        _check_json_error(status, headers, payload)
        assert headers.get("connection") == "close", (name, headers)
        out["400 JSON"] += 1
    # The broken chunk reaches the app mid-body: it must end as a client that went away (499), not a 500.
    _wait_for(
        lambda: (
            server.metrics().get('sd_requests_total{route="/score",status="499"}', 0)
            > before.get('sd_requests_total{route="/score",status="499"}', 0)
        )
    )
    fives = {k: v for k, v in server.metrics().items() if 'status="5' in k and v != before.get(k, 0)}
    assert not fives, fives
    resp = httpx.post(f"{server.url}/score", json=body("after", 1, 0), timeout=60)
    assert resp.status_code == 200
    return out


def _wait_for(predicate: Any, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def connection_cap(server: FakeServer, limit: int) -> Counter[str]:
    """With ``limit`` connections open, one more request is a JSON 503 with Retry-After; once they close, 200."""
    out: Counter[str] = Counter()
    port = int(server.url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(limit)]
    try:
        time.sleep(0.2)  # let the server accept them all
        status, headers, payload = _raw_exchange(port, b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 503, (status, payload)
        assert "SD_ENDPOINT_MAX_CONNECTIONS" in _check_json_error(status, headers, payload)
        assert int(headers["retry-after"]) >= 1
        out["503 JSON past the cap"] += 1
    finally:
        for s in idle:
            s.close()
    end = time.monotonic() + 30
    while httpx.get(f"{server.url}/ready", timeout=30).status_code != 200:
        assert time.monotonic() < end, "the server never came back under its connection cap"
        time.sleep(0.1)
    out["200 once closed"] += 1
    return out


def screening_faults(rounds: int = 3) -> Counter[str]:
    """AACS down (fail closed: 503 + Retry-After, nothing unscreened), slow (a timed-out call is retried)
    and flapping (a failed call is retried) against the emulator, with the real SDK-based screener."""
    from aacs_emulator import AacsEmulator
    from sd_endpoint.safety.aacs import AzureContentSafetyScreener
    from sd_endpoint.settings import ContentSafetySettings

    out: Counter[str] = Counter()
    key = "reliability-key-0123456789"
    with AacsEmulator(key=key) as emulator:
        screener = AzureContentSafetyScreener.from_settings(
            ContentSafetySettings(endpoint=emulator.url, key=key, retries=1, timeout_s=1.0)
        )
        with fake_server(screener=screener) as server:
            for r in range(rounds):
                emulator.set_fault("down")
                resp = httpx.post(f"{server.url}/score", json=body(f"down {r}", r, 0), timeout=120)
                assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1, resp.text[:300]
                assert "generated_image" not in resp.text
                out["down: 503 fail-closed"] += 1
                emulator.set_fault("slow", delay_s=4.0, count=1)
                resp = httpx.post(f"{server.url}/score", json=body(f"slow {r}", r, 0), timeout=120)
                assert resp.status_code == 200, resp.text[:300]
                out["slow: retried, 200"] += 1
                emulator.set_fault("503", count=1)
                resp = httpx.post(f"{server.url}/score", json=body(f"flap {r}", r, 0), timeout=120)
                assert resp.status_code == 200 and resp.headers["x-content-safety"] == "screened", resp.text[:300]
                out["flapping: retried, 200"] += 1
                emulator.clear_fault()
    return out
