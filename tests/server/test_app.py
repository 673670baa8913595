"""The app in-process, over FakeBackend: routes, headers, errors, auth, load control, logs, API docs.

The same app runs in a real uvicorn process with the tiny model in test_live.py / test_lifecycle.py; here
the layers above the model are checked fast and deterministically.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sd_endpoint import metrics
from sd_endpoint.server import create_app
from sd_endpoint.server.app import is_loopback, run_server
from sd_endpoint.service import GenerationService, Scoring
from tests.conftest import small_request
from tests.server.conftest import KEYS, fake_app, fake_settings, running, wait_ready
from tests.server.helpers import BAD_INPUTS, decode_image
from tests.support.fakes import FakeBackend, colour_of

NOT_FOUND = (
    "The requested URL was not found on the server. If you entered the URL manually please check your "
    "spelling and try again."
)


def body(prompt: str = "a red fox", seed: int = 1, **params: Any) -> dict[str, Any]:
    request = small_request([prompt], seed=seed, **params)
    return request


def sample(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ------------------------------------------------------------------------------------------------
# Routes


def test_liveness_readiness_and_score(client: TestClient) -> None:
    live = client.get("/")
    assert (live.status_code, live.text) == (200, "Healthy")
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready" and ready.json()["backend"] == "fake"
    resp = client.post("/score", json=body("a red fox", seed=5))
    assert resp.status_code == 200, resp.text
    (record,) = resp.json()
    assert (record["prompt"], record["seed"], record["index"]) == ("a red fox", 5, 0)
    assert record["nsfw_content_detected"] is None
    image = decode_image(record)
    assert image.size == (64, 64) and image.getpixel((0, 0)) == colour_of("a red fox", 5)


def test_unknown_path_and_wrong_method_have_azmlinfsrv_bodies(client: TestClient) -> None:
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.json() == {"message": NOT_FOUND}
    wrong = client.put("/score")
    assert wrong.status_code == 405
    assert wrong.json() == {"message": "The method is not allowed for the requested URL."}
    assert wrong.headers["allow"] == "OPTIONS, POST"
    assert client.get("/score").status_code == 405
    assert client.post("/ready").status_code == 405
    options = client.options("/score")
    assert options.status_code == 200 and options.content == b""


def test_wrong_method_on_a_probe_names_its_method_in_allow(client: TestClient) -> None:
    # The probes live in their own module; the 405's Allow must still see their routes.
    for path in ("/", "/ready", "/metrics", "/swagger.json"):
        wrong = client.post(path)
        assert (wrong.status_code, wrong.headers["allow"]) == (405, "GET"), path


def test_metrics_endpoint_counts_requests_by_route_and_status(client: TestClient) -> None:
    before = sample("sd_requests_total", route="/score", status="200")
    before_bad = sample("sd_requests_total", route="/score", status="400")
    before_images = sample("sd_images_generated_total")
    # Each of these must move with one generated request (a name in the text proves nothing: every
    # metric is registered, with its HELP line, at import).
    moved = {
        "sd_request_seconds_count": {"route": "/score"},
        "sd_queue_wait_seconds_count": {},
        "sd_generation_seconds_count": {},
        "sd_encode_seconds_count": {},
        "sd_batch_size_images_count": {},
        "sd_batch_size_requests_count": {},
        "sd_denoising_steps_total": {},
    }
    before_moved = {name: sample(name, **labels) for name, labels in moved.items()}
    client.post("/score", json=body(num_images_per_prompt=2))
    client.post("/score", content=b"{")
    text = client.get("/metrics").text
    assert 'sd_requests_total{route="/score",status="200"}' in text
    assert sample("sd_requests_total", route="/score", status="200") == before + 1
    assert sample("sd_requests_total", route="/score", status="400") == before_bad + 1
    assert sample("sd_images_generated_total") == before_images + 2
    for name, labels in moved.items():
        assert sample(name, **labels) > before_moved[name], name
    assert sample("sd_denoising_steps_per_second") > 0
    assert (sample("sd_requests_in_flight"), sample("sd_requests_queued"), sample("sd_ready")) == (0, 0, 1)
    assert client.get("/nope/deeper").status_code == 404
    assert 'route="unmatched"' in client.get("/metrics").text  # unknown paths share one label


# ------------------------------------------------------------------------------------------------
# API description


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_openapi_documents_the_real_schemas_errors_and_examples(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    op = doc["paths"]["/score"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ScoreRequest"}
    examples = op["requestBody"]["content"]["application/json"]["examples"]
    assert any(e["value"]["input_data"]["data"] == ["an astronaut riding a horse"] for e in examples.values())
    schemas = doc["components"]["schemas"]
    assert set(schemas["Parameters"]["properties"]) >= {"num_inference_steps", "guidance_scale", "seed", "scheduler"}
    assert schemas["Parameters"]["additionalProperties"] is False
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["type"] == "array" and ok["items"] == {"$ref": "#/components/schemas/ImageRecord"}
    for status in ("400", "401", "408", "413", "415", "429", "431", "500", "503"):
        schema = op["responses"][status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorBody"}, status
    assert "Retry-After" in op["responses"]["429"]["headers"]
    assert op["security"] == [{"Bearer": []}]
    assert doc["components"]["securitySchemes"]["Bearer"]["scheme"] == "bearer"
    for ref in _refs(doc):
        _resolve(doc, ref)  # every reference resolves
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "/openapi.json" in docs.text


def test_swagger_json_versions_as_azmlinfsrv(client: TestClient) -> None:
    v2 = client.get("/swagger.json").json()
    assert v2["swagger"] == "2.0"
    assert client.get("/swagger.json", params={"version": "2.0"}).json() == v2
    score = v2["paths"]["/score"]["post"]
    assert score["operationId"] == "RunMLService"
    (payload,) = score["parameters"]
    assert (payload["name"], payload["in"]) == ("serviceInputPayload", "body")
    assert payload["schema"] == {"$ref": "#/definitions/ScoreRequest"}
    assert score["responses"]["200"]["schema"]["items"] == {"$ref": "#/definitions/ImageRecord"}
    assert score["responses"]["429"]["schema"] == {"$ref": "#/definitions/ErrorBody"}
    assert v2["paths"]["/"]["get"]["operationId"] == "ServiceHealthCheck"
    assert v2["securityDefinitions"]["Bearer"]["in"] == "header"
    assert "components" not in json.dumps(v2) and '"anyOf"' not in json.dumps(v2)
    steps = v2["definitions"]["Parameters"]["properties"]["num_inference_steps"]
    assert (steps["type"], steps["minimum"], steps["x-nullable"]) == ("integer", 1, True)
    for ref in _refs(v2):
        _resolve(v2, ref)

    v3 = client.get("/swagger.json", params={"version": "3"}).json()
    assert v3["openapi"] == "3.0.3"
    assert '{"type": "null"}' not in json.dumps(v3)
    assert v3["components"]["schemas"]["Parameters"]["properties"]["seed"]["nullable"] is True
    for ref in _refs(v3):
        _resolve(v3, ref)
    assert client.get("/swagger.json", params={"version": "3.1"}).json() == client.get("/openapi.json").json()

    bad = client.get("/swagger.json", params={"version": "9"})
    assert bad.status_code == 404
    assert bad.json()["message"] == "Swagger version [9] is not valid. Supported versions: ['2', '3', '3.1']"


def test_swagger_2_keeps_media_types_examples_and_response_headers(client: TestClient) -> None:
    v2 = client.get("/swagger.json").json()
    health = v2["paths"]["/"]["get"]
    assert health["produces"] == ["text/plain"]
    assert health["responses"]["200"]["examples"] == {"text/plain": "Healthy"}
    assert v2["paths"]["/v1/images/edits"]["post"]["consumes"] == ["multipart/form-data"]
    score = v2["paths"]["/score"]["post"]
    assert (score["consumes"], score["produces"]) == (["application/json"], ["application/json"])
    assert score["responses"]["429"]["headers"]["Retry-After"]["type"] == "integer"
    assert score["responses"]["401"]["headers"]["WWW-Authenticate"]["type"] == "string"


# ------------------------------------------------------------------------------------------------
# Request ids


def test_request_ids_are_echoed_or_made_as_azmlinfsrv_does(client: TestClient) -> None:
    made = client.post("/score", json=body())
    rid = made.headers["x-request-id"]
    assert str(uuid.UUID(rid)) == rid
    assert made.headers["x-ms-request-id"] == rid and "x-ms-client-request-id" not in made.headers
    assert float(made.headers["x-ms-run-fn-exec-ms"]) > 0
    assert made.headers["x-ms-run-function-failed"] == "False"

    echoed = client.post(
        "/score", json=body(), headers={"x-request-id": "rid-1", "x-ms-client-request-id": "client-1", "TraceId": "t1"}
    )
    assert echoed.headers["x-request-id"] == "rid-1"
    assert echoed.headers["x-ms-client-request-id"] == "client-1"
    assert echoed.headers["x-ms-request-id"] == "client-1"  # derived from the client request id
    assert echoed.headers["traceid"] == "t1"

    legacy = client.get("/", headers={"x-ms-request-id": "legacy-1"})
    assert legacy.headers["x-ms-request-id"] == "legacy-1"
    assert legacy.headers["x-ms-client-request-id"] == "legacy-1"
    assert "x-ms-run-fn-exec-ms" not in legacy.headers  # only on /score

    failed = client.post("/score", content=b"{")
    assert failed.headers["x-ms-run-function-failed"] == "False" and "x-ms-run-fn-exec-ms" in failed.headers


@pytest.mark.parametrize("header", ["x-request-id", "x-ms-client-request-id", "x-ms-request-id"])
def test_ids_over_100_characters_get_431(client: TestClient, header: str) -> None:
    assert client.get("/", headers={header: "a" * 100}).status_code == 200
    resp = client.post("/score", json=body(), headers={header: "a" * 101})
    assert resp.status_code == 431
    assert "must not exceed 100 characters" in resp.json()["message"]
    assert header in resp.json()["message"]
    assert resp.headers["x-ms-request-id"] == resp.headers["x-request-id"]  # fresh ids, as for any answer


# ------------------------------------------------------------------------------------------------
# Bad input and limits


@pytest.mark.parametrize(("case", "raw", "expected"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_each_bad_input_is_a_400_that_says_what_is_wrong(
    client: TestClient, case: str, raw: bytes, expected: str
) -> None:
    resp = client.post("/score", content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, (case, resp.text)
    assert resp.headers["content-type"] == "application/json"
    assert set(resp.json()) == {"message"}
    assert expected in resp.json()["message"]


def test_content_type_must_be_json_when_given(client: TestClient) -> None:
    raw = json.dumps(body()).encode()
    refused = client.post("/score", content=raw, headers={"Content-Type": "text/plain"})
    assert refused.status_code == 415 and "application/json" in refused.json()["message"]
    assert client.post("/score", content=raw, headers={"Content-Type": "application/json; charset=utf-8"}).is_success
    assert client.post("/score", content=raw, headers={"Content-Type": ""}).is_success  # none, as score.py


def test_body_size_limit_with_and_without_content_length() -> None:
    app, _ = fake_app(max_body_bytes=2000)
    with TestClient(app) as c:
        wait_ready(c.get)
        big = json.dumps(body("x" * 3000)).encode()
        declared = c.post("/score", content=big, headers={"Content-Type": "application/json"})
        assert declared.status_code == 413 and "SD_ENDPOINT_MAX_BODY_BYTES" in declared.json()["message"]

        def chunks() -> Any:
            for i in range(0, len(big), 500):
                yield big[i : i + 500]

        streamed = c.post("/score", content=chunks(), headers={"Content-Type": "application/json"})
        assert "content-length" not in streamed.request.headers
        assert streamed.status_code == 413
        assert c.post("/score", json=body()).status_code == 200


# ------------------------------------------------------------------------------------------------
# Authentication


@pytest.mark.parametrize("key", KEYS)
def test_each_configured_key_is_accepted(keyed_client: TestClient, key: str) -> None:
    resp = keyed_client.post("/score", json=body(), headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200
    assert keyed_client.get("/metrics", headers={"Authorization": f"bearer {key}"}).status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Bearer wrong-key", f"Basic {KEYS[0]}", f"Bearer {KEYS[0]}x", KEYS[0]],
)
def test_missing_or_wrong_keys_get_401(keyed_client: TestClient, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    resp = keyed_client.post("/score", json=body(), headers=headers)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert set(resp.json()) == {"message"} and "Bearer" in resp.json()["message"]
    assert KEYS[0] not in resp.text and KEYS[1] not in resp.text
    assert keyed_client.get("/metrics", headers=headers).status_code == 401


def test_probes_and_api_description_stay_open_with_keys(keyed_client: TestClient) -> None:
    assert keyed_client.get("/").status_code == 200
    assert keyed_client.get("/ready").status_code == 200
    assert keyed_client.get("/swagger.json").status_code == 200
    assert keyed_client.get("/openapi.json").status_code == 200


def test_no_key_on_a_public_address_warns(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.com")
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # never binds
    with caplog.at_level(logging.WARNING, logger="sd_endpoint.server"):
        assert run_server(fake_settings(host="0.0.0.0")) == 0
    assert any("no key" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sd_endpoint.server"):
        run_server(fake_settings(host="0.0.0.0", keys="k1"))
        run_server(fake_settings(host="127.0.0.1"))
    assert not any("no key" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# Start-up


def test_liveness_answers_while_the_model_loads_and_readiness_waits_for_warm_up() -> None:
    backend = FakeBackend()
    backend.gate.clear()  # the warm-up generation blocks
    settings = fake_settings()
    app = create_app(settings, GenerationService(settings, backend), on_fatal=lambda: None)
    with TestClient(app) as c:
        assert backend.entered.wait(30)
        assert c.get("/").text == "Healthy"
        not_ready = c.get("/ready")
        assert not_ready.status_code == 503 and "warming up" in not_ready.json()["message"]
        assert int(not_ready.headers["retry-after"]) > 0
        score = c.post("/score", json=body())
        assert score.status_code == 503 and set(score.json()) == {"message"}
        backend.gate.set()
        wait_ready(c.get)
        assert c.post("/score", json=body()).status_code == 200


def test_a_model_that_fails_to_load_stops_the_server() -> None:
    fatal = threading.Event()
    settings = fake_settings(model="/nonexistent/sd-model")
    app = create_app(settings, on_fatal=fatal.set)
    with TestClient(app) as c:
        assert fatal.wait(60)
        ready = c.get("/ready")
        assert ready.status_code == 503 and "SD_ENDPOINT_MODEL" in ready.json()["message"]
        assert c.get("/").status_code == 503  # liveness fails too: restart me
        assert app.state.sd.exit_code == 2


# ------------------------------------------------------------------------------------------------
# Load: concurrency limits, timeouts, failures


def test_requests_past_the_limits_get_429_at_once_and_the_rest_their_own_images() -> None:
    app, backend = fake_app(max_concurrent_requests=1, max_queued_requests=1, max_queue_wait_ms=60_000)

    async def scenario() -> list[Any]:
        async with running(app) as c:
            backend.gate.clear()
            backend.entered.clear()
            first = asyncio.create_task(c.post("/score", json=body("p0", seed=100)))
            while not backend.entered.is_set():
                await asyncio.sleep(0.005)
            rest = [asyncio.create_task(c.post("/score", json=body(f"p{i}", seed=100 + i))) for i in range(1, 5)]
            while sample("sd_requests_queued") < 1:
                await asyncio.sleep(0.005)
            # One in flight, one queued: the other three are refused without waiting for the gate.
            refused = [t for t in rest if t.done() or await _settles(t)]
            assert len(refused) == 3
            backend.gate.set()
            return [await t for t in [first, *rest]]

    responses = asyncio.run(scenario())
    statuses = [r.status_code for r in responses]
    assert sorted(statuses) == [200, 200, 429, 429, 429]
    for i, resp in enumerate(responses):
        if resp.status_code == 429:
            assert int(resp.headers["retry-after"]) >= 1
            assert "SD_ENDPOINT_MAX_CONCURRENT_REQUESTS" in resp.json()["message"]
        else:
            (record,) = resp.json()
            assert (record["prompt"], record["seed"]) == (f"p{i}", 100 + i)
            assert decode_image(record).getpixel((0, 0)) == colour_of(f"p{i}", 100 + i)
    assert statuses[0] == 200


async def _settles(task: asyncio.Task[Any], within: float = 0.5) -> bool:
    done, _ = await asyncio.wait({task}, timeout=within)
    return bool(done)


def test_a_timeout_answers_408_and_stops_the_generation() -> None:
    backend = FakeBackend(step_seconds=0.01)
    app, _ = fake_app(backend, request_timeout_ms=300)
    before = sample("sd_generations_stopped_total", reason="timeout")
    with TestClient(app) as c:
        wait_ready(c.get)
        warm_steps = backend.steps_run
        resp = c.post("/score", json=body(num_inference_steps=150))  # >= 1.5 s of steps
        assert resp.status_code == 408
        assert "SD_ENDPOINT_REQUEST_TIMEOUT_MS" in resp.json()["message"]
        for _ in range(3000):
            if sample("sd_generations_stopped_total", reason="timeout") == before + 1:
                break
            time.sleep(0.01)
        assert sample("sd_generations_stopped_total", reason="timeout") == before + 1
        ran = backend.steps_run - warm_steps
        assert 0 < ran < 150  # stopped between denoising steps
        time.sleep(0.1)
        assert backend.steps_run - warm_steps == ran


def test_a_failing_request_gets_500_and_its_batch_mates_their_images() -> None:
    app, backend = fake_app(max_concurrent_requests=4, max_batch_size=4)

    async def scenario() -> list[Any]:
        async with running(app) as c:
            backend.gate.clear()
            backend.entered.clear()
            first = asyncio.create_task(c.post("/score", json=body("first", seed=1)))
            while not backend.entered.is_set():
                await asyncio.sleep(0.005)
            prompts = ["good one", "boom", "good two"]
            rest = [asyncio.create_task(c.post("/score", json=body(p, seed=2))) for p in prompts]
            while app.state.sd.batcher.queued < 3:
                await asyncio.sleep(0.005)
            backend.gate.set()
            return [await t for t in [first, *rest]]

    first, good1, bad, good2 = asyncio.run(scenario())
    # warm-up, first, the three merged, then each of the three alone after the merged call failed
    assert [len(t) for _, t in backend.calls] == [1, 1, 3, 1, 1, 1]
    assert bad.status_code == 500 and bad.headers["x-ms-run-function-failed"] == "True"
    assert bad.headers["x-request-id"] in bad.json()["message"]
    for resp, prompt in ((first, "first"), (good1, "good one"), (good2, "good two")):
        assert resp.status_code == 200
        assert resp.json()[0]["prompt"] == prompt


# ------------------------------------------------------------------------------------------------
# Logs


def test_one_structured_log_line_per_request_without_prompts_or_keys(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = fake_app(keys=",".join(KEYS))
    with TestClient(app) as c, caplog.at_level(logging.DEBUG, logger="sd_endpoint.access"):
        wait_ready(c.get)
        caplog.clear()
        c.post(
            "/score",
            json=body("a secret prompt", num_images_per_prompt=2),
            headers={"Authorization": f"Bearer {KEYS[1]}", "x-request-id": "log-test-1"},
        )
        c.post("/score", json=body(), headers={"Authorization": "Bearer nope", "x-request-id": "log-test-2"})
    lines = [r for r in caplog.records if r.name == "sd_endpoint.access"]
    by_id = {r.request_id: r for r in lines}  # type: ignore[attr-defined]
    ok = by_id["log-test-1"]
    assert ok.levelno == logging.INFO
    assert (ok.status, ok.images, ok.steps, ok.path) == (200, 2, 3, "/score")  # type: ignore[attr-defined]
    assert {"queue", "generate", "encode"} <= set(ok.timings_ms)  # type: ignore[attr-defined]
    assert ok.batch_requests == 1 and ok.duration_ms > 0  # type: ignore[attr-defined]
    assert by_id["log-test-2"].status == 401  # type: ignore[attr-defined]
    everything = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "a secret prompt" not in everything
    assert KEYS[0] not in everything and KEYS[1] not in everything


def test_prompts_are_logged_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = fake_app(log_prompts=True)
    with TestClient(app) as c, caplog.at_level(logging.INFO, logger="sd_endpoint.access"):
        wait_ready(c.get)
        c.post("/score", json=body("a logged prompt"), headers={"x-request-id": "log-test-3"})
    (line,) = [r for r in caplog.records if getattr(r, "request_id", "") == "log-test-3" and r.name.endswith("access")]
    assert line.prompts == ["a logged prompt"]  # type: ignore[attr-defined]


def test_an_unexpected_error_is_a_500_with_the_request_id(monkeypatch: pytest.MonkeyPatch) -> None:
    app, _ = fake_app()
    with TestClient(app) as c:
        wait_ready(c.get)

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise ValueError("a bug")

        monkeypatch.setattr(Scoring, "encode", broken)  # a bug after the generation, with the slot held
        resp = c.post("/score", json=body(), headers={"x-request-id": "bug-1"})
        assert resp.status_code == 500
        assert resp.json() == {"message": "An unexpected error occurred; see the server log (request id bug-1)."}
        assert resp.headers["x-ms-run-function-failed"] == "True"
        monkeypatch.undo()
        assert c.post("/score", json=body()).status_code == 200  # the slot was given back


def test_draining_reports_not_ready_and_refuses_new_work(client: TestClient) -> None:
    client.app.state.sd.begin_drain()  # type: ignore[attr-defined]  # what SIGTERM does first
    ready = client.get("/ready")
    assert ready.status_code == 503 and "shutting down" in ready.json()["message"]
    assert client.post("/score", json=body()).status_code == 503
    assert client.get("/").status_code == 200


def test_every_call_into_the_model_warm_up_included_is_made_by_the_one_worker_thread() -> None:
    """Breaks if the load thread ran the warm-up itself (it then made the model's first call)."""
    threads: list[tuple[str, str]] = []

    class Recording(FakeBackend):
        def generate(self, spec: Any, tasks: Any, cancel: Any = None, on_step: Any = None) -> Any:
            threads.append((tasks[0].prompt, threading.current_thread().name))
            return super().generate(spec, tasks, cancel, on_step)

    settings = fake_settings(warmup=True)
    service = GenerationService(settings, Recording())
    assert not service.ready
    with TestClient(create_app(settings, service, on_fatal=lambda: None)) as c:
        wait_ready(c.get)
        assert c.get("/ready").json()["warmup_seconds"] >= 0
        assert c.post("/score", json=small_request(["after the warm-up"])).status_code == 200
    assert [prompt for prompt, _ in threads] == ["warm-up", "after the warm-up"]
    assert len({name for _, name in threads}) == 1 and threads[0][1] != "load-model"
