"""Who decides a request's fate, over the real app: honest timings, a dead worker, a failed health check,
a client that leaves. FakeBackend stands in for the model (these are the layers above it)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest

from sd_endpoint import metrics
from sd_endpoint.jobs import BatchResult
from tests.conftest import small_request
from tests.server.conftest import fake_app, running
from tests.support.fakes import FakeBackend


def sample(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def access_lines(caplog: pytest.LogCaptureFixture) -> dict[str, logging.LogRecord]:
    return {
        r.request_id: r  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "sd_endpoint.access" and getattr(r, "path", "") == "/score"
    }


def test_timings_are_disjoint_stages_that_add_up_to_the_duration(caplog: pytest.LogCaptureFixture) -> None:
    """Breaks if "generate" is measured around the wait for the worker (it then holds the queue time too),
    or if the queue stops counting the wait behind a running call (it logged 0.1 ms after a 50 s wait)."""
    backend = FakeBackend(step_seconds=0.05)
    app, _ = fake_app(backend, max_concurrent_requests=2, max_batch_size=1)
    steps = 6  # >= 0.3 s per call, on any machine

    async def scenario() -> None:
        async with running(app) as c:
            first = asyncio.create_task(
                c.post("/score", json=small_request(["one"], num_inference_steps=steps), headers={"x-request-id": "t1"})
            )
            while len(backend.calls) < 2:  # warm-up, then the first request's call
                await asyncio.sleep(0.005)
            second = await c.post(
                "/score", json=small_request(["two"], num_inference_steps=steps), headers={"x-request-id": "t2"}
            )
            assert (await first).status_code == 200 and second.status_code == 200

    with caplog.at_level(logging.INFO, logger="sd_endpoint.access"):
        asyncio.run(scenario())
    lines = access_lines(caplog)
    call_s = steps * backend.step_seconds
    for rid in ("t1", "t2"):
        line = lines[rid]
        timings: dict[str, float] = line.timings_ms  # type: ignore[attr-defined]
        duration: float = line.duration_ms  # type: ignore[attr-defined]
        assert {"parse", "queue", "generate", "encode"} <= set(timings)
        # Within a few ms on an idle machine; a busy one can pause the loop between stages (32 ms seen at load 6).
        assert abs(sum(timings.values()) - duration) <= max(60.0, 0.1 * duration), (timings, duration)
        assert timings["generate"] >= call_s * 1000 * 0.9
    # The second waited behind the first's whole call: that wait is queue, not generate.
    second = lines["t2"].timings_ms  # type: ignore[attr-defined]
    assert second["queue"] >= call_s * 1000 * 0.5
    assert second["generate"] < second["queue"] + call_s * 1000


def test_a_stage_run_off_the_loop_is_timed_as_the_request_waited_for_it() -> None:
    """Breaks if _off_loop keeps the stage's own in-thread timing: the wait to get the thread (and back)
    would fall between the stages, and they would no longer add up to the duration on a busy machine."""
    from types import SimpleNamespace

    from sd_endpoint.server.routes import _Work

    timings: dict[str, float] = {"generate": 1.0}

    def encode() -> None:  # its own clock saw 10 ms; the request waited 200 ms for it (a slow thread hop)
        time.sleep(0.2)
        timings["encode"] = 0.01

    work = _Work(SimpleNamespace(timings=timings), None, None, None)  # type: ignore[arg-type]
    asyncio.run(work._off_loop(encode))
    assert timings["generate"] == 1.0  # earlier stages are untouched
    assert 0.2 <= timings["encode"] < 5.0


class Fatal(BaseException):
    """Ends the worker thread (a plain Exception is caught by its iteration wrapper)."""


class DyingBackend(FakeBackend):
    def generate(self, spec: Any, tasks: Any, cancel: Any = None, on_step: Any = None) -> BatchResult:
        result = super().generate(spec, tasks, cancel, on_step)
        if tasks[0].prompt == "fatal":
            raise Fatal("the worker is killed")
        return result


def test_a_dead_worker_fails_liveness_says_why_and_answers_queued_requests_at_once() -> None:
    """Breaks if liveness only reads the phase string (the server stayed "Healthy" with no worker)."""
    backend = DyingBackend()
    app, _ = fake_app(backend, max_concurrent_requests=2, max_batch_size=1, request_timeout_ms=600_000)
    before = sample("sd_worker_deaths_total")

    async def scenario() -> None:
        async with running(app) as c:
            assert (await c.get("/")).status_code == 200
            backend.gate.clear()
            backend.entered.clear()
            fatal = asyncio.create_task(c.post("/score", json=small_request(["fatal"])))
            while not backend.entered.is_set():
                await asyncio.sleep(0.005)
            queued = asyncio.create_task(c.post("/score", json=small_request(["queued"])))
            while app.state.sd.batcher.queued < 1:
                await asyncio.sleep(0.005)
            started = time.monotonic()
            backend.gate.set()
            for resp in (await fatal, await queued):
                assert resp.status_code == 503 and "worker stopped" in resp.json()["message"]
                assert int(resp.headers["Retry-After"]) >= 1
            assert time.monotonic() - started < 60  # at once, not at the 600 s deadline
            live = await c.get("/")
            assert live.status_code == 503 and "Fatal" in live.json()["message"]
            ready = await c.get("/ready")
            assert ready.status_code == 503 and "worker stopped" in ready.json()["message"]
            late = await c.post("/score", json=small_request(["late"]))
            assert late.status_code == 503

    asyncio.run(scenario())
    assert sample("sd_worker_deaths_total") == before + 1


def test_readiness_fails_when_the_device_does_not_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Breaks if /ready stops running the health check (a tiny tensor op on the model's device)."""
    app, _ = fake_app()

    async def scenario() -> None:
        async with running(app) as c:
            state = app.state.sd
            assert (await c.get("/ready")).status_code == 200
            calls: list[int] = []

            def broken() -> None:
                calls.append(1)
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

            monkeypatch.setattr(state.service, "health_check", broken)
            state._health_at = 0.0  # the next probe checks again
            ready = await c.get("/ready")
            assert ready.status_code == 503 and "illegal memory access" in ready.json()["message"]
            assert calls == [1]
            assert (await c.get("/")).status_code == 200  # liveness is the worker's, not the device's

    asyncio.run(scenario())


def test_the_real_health_check_runs_a_tensor_op() -> None:
    app, backend = fake_app()
    state = app.state.sd
    state.service.health_check()  # FakeBackend says "cpu": one op on the CPU


def test_a_client_that_leaves_is_answered_499_and_its_generation_stops() -> None:
    """Breaks if the route stops racing the work against the disconnect listener (the generation would
    then run to its end for nobody)."""
    backend = FakeBackend(step_seconds=0.05)  # 7.5 s if the 150 steps ran to the end
    app, _ = fake_app(backend, request_timeout_ms=600_000)
    body = json.dumps(small_request(["leaving"], num_inference_steps=150)).encode()
    statuses: list[int] = []

    async def scenario() -> None:
        async with running(app) as c:
            assert (await c.get("/ready")).status_code == 200
            warm = backend.steps_run
            sent_body = False

            async def receive() -> dict[str, Any]:
                nonlocal sent_body
                if not sent_body:
                    sent_body = True
                    return {"type": "http.request", "body": body, "more_body": False}
                while backend.steps_run - warm < 5:  # leave once the generation is under way
                    await asyncio.sleep(0.005)
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "path": "/score",
                "raw_path": b"/score",
                "query_string": b"",
                "headers": [(b"content-type", b"application/json")],
                "client": ("127.0.0.1", 1),
                "server": ("testserver", 80),
                "scheme": "http",
            }
            await asyncio.wait_for(app(scope, receive, send), 60)
            ran = backend.steps_run
            await asyncio.sleep(0.2)
            assert backend.steps_run - ran <= 1  # stopped at the next denoising step
            assert ran - warm < 150

    asyncio.run(scenario())
    assert statuses == [499]
