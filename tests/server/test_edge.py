"""Hostile input at the HTTP edge: each case is a clear 4xx (or a bounded echo), never a 500 or a leak.

Every test names, in its docstring, the one-line change that makes it fail.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sd_endpoint.contract import Limits
from sd_endpoint.errors import InvalidRequest, ScreeningUnavailable
from sd_endpoint.request_parsing import MAX_JSON_DEPTH, json_depth, parse_request
from sd_endpoint.safety.base import Verdict
from sd_endpoint.server import create_app
from sd_endpoint.service import GenerationService
from tests.server.conftest import KEYS, fake_app, fake_settings, wait_ready
from tests.support.fakes import FakeBackend


def raw(body: str) -> bytes:
    """A JSON text as bytes, keeping JSON escapes such as \\ud800 for the server to decode."""
    return body.encode("ascii")


def generated(backend: FakeBackend) -> list[Any]:
    """The backend calls made for requests (the start-up warm-up left out)."""
    return [call for call in backend.calls if call[1][0].prompt != "warm-up"]


LONE_SURROGATES = [
    # (case, body, the field the 400 must name)
    ("bare prompt", r'{"input_data": {"data": ["\ud800"]}}', "input_data.data[0].prompt"),
    ("prompt after text", r'{"input_data": {"data": ["a cat \udfff"]}}', "input_data.data[0].prompt"),
    (
        "negative prompt in a list row",
        r'{"input_data": {"columns": ["prompt", "negative_prompt"], "data": [["a cat", "\ud800"]]}}',
        "input_data.data[0].negative_prompt",
    ),
    (
        "negative prompt in an object row",
        r'{"input_data": {"data": [{"prompt": "a cat", "negative_prompt": "\udc00"}]}}',
        "input_data.data[0].negative_prompt",
    ),
    (
        "default negative prompt",
        r'{"input_data": {"data": ["a cat"]}, "parameters": {"negative_prompt": "\ud800"}}',
        "parameters.negative_prompt",
    ),
    ("index label", r'{"input_data": {"data": ["a cat"], "index": ["\ud800"]}}', "input_data.index[0]"),
    ("a key", r'{"input_data": {"data": ["a cat"], "\ud800": 1}}', "input_data"),
]


@pytest.mark.parametrize(("case", "body", "field"), LONE_SURROGATES, ids=[c[0] for c in LONE_SURROGATES])
def test_a_lone_surrogate_is_a_400_naming_the_field_before_anything_runs(case: str, body: str, field: str) -> None:
    """Breaks if the surrogate checks (contract._check_text / request_parsing._check_strings) are removed: the
    tokenizer (or the JSON encoder of the response) then fails with a 500."""
    screened: list[Any] = []

    class RecordingScreener:
        enabled = True

        def screen_prompts(self, prompts: Sequence[tuple[str, str | None]]) -> list[Verdict]:
            screened.append(prompts)
            return [Verdict("prompt", False) for _ in prompts]

        def screen_images(self, images: Sequence[bytes]) -> list[Verdict]:
            return [Verdict("image", False) for _ in images]

        def close(self) -> None:
            pass

    settings = fake_settings()
    backend = FakeBackend()
    app = create_app(settings, GenerationService(settings, backend, RecordingScreener()), on_fatal=lambda: None)
    with TestClient(app) as client:
        wait_ready(client.get)
        resp = client.post("/score", content=raw(body), headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    message = resp.json()["message"]
    assert field in message and "surrogate" in message
    assert generated(backend) == [] and screened == []


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1_000, 100_000])
def test_deep_nesting_is_a_400_without_a_traceback(
    client: TestClient, caplog: pytest.LogCaptureFixture, depth: int
) -> None:
    """Breaks if decode_body's depth check is removed (json.loads raises RecursionError at ~1000: a 500)."""
    body = '{"input_data": {"data": ["a"]}, "x": ' + "[" * depth + "]" * depth + "}"
    with caplog.at_level(logging.INFO):
        resp = client.post("/score", content=body.encode(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text[:300]
    assert f"at most {MAX_JSON_DEPTH}" in resp.json()["message"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_an_unclosed_deep_body_is_a_400_too(client: TestClient) -> None:
    resp = client.post("/score", content=b"[" * 50_000, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and "levels deep" in resp.json()["message"]


def test_a_decoded_body_is_bounded_as_well() -> None:
    """score.py hands a dict that never went through decode_body; _check_strings bounds it."""
    nested: Any = "a"
    for _ in range(2_000):
        nested = [nested]
    with pytest.raises(InvalidRequest, match="nests deeper than"):
        parse_request({"input_data": {"data": ["a"], "columns": nested}}, Limits(), decoded=True)


def test_json_depth_ignores_brackets_inside_strings() -> None:
    assert json_depth('{"a": [1, {"b": "[[[[{{{{"}]}') == 3
    assert json_depth(r'["\"[[[["]') == 1
    assert json_depth("") == 0


def test_trace_id_is_bounded_like_x_request_id(client: TestClient) -> None:
    """Breaks if the TraceId length check in middleware.request_id_headers is removed (60 kB came back)."""
    ok = client.get("/", headers={"TraceId": "t" * 100})
    assert ok.status_code == 200 and ok.headers["TraceId"] == "t" * 100
    long = client.get("/", headers={"TraceId": "t" * 101})
    assert long.status_code == 431 and "TraceId" in long.json()["message"]
    assert "TraceId" not in long.headers


def test_score_with_a_trailing_slash_is_a_404_not_a_redirect(client: TestClient) -> None:
    """Breaks if redirect_slashes=False is dropped from create_app: a 307 with a Location from Host."""
    resp = client.post(
        "/score/", json={"input_data": {"data": ["a"]}}, headers={"Host": "evil.example"}, follow_redirects=False
    )
    assert resp.status_code == 404
    assert "location" not in resp.headers
    assert resp.json()["message"]


def test_ready_without_the_key_says_only_whether(keyed_client: TestClient) -> None:
    """Breaks if readiness returns describe() without checking the key."""
    anonymous = keyed_client.get("/ready")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready"}
    keyed = keyed_client.get("/ready", headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert keyed.status_code == 200 and keyed.json()["backend"] == "fake"


def test_a_failed_load_keeps_the_model_path_from_anonymous_probes(tmp_path: Any) -> None:
    """Breaks if not_ready(detail=...) is ignored: the ModelLoadError names the model's path."""
    secret = tmp_path / "secret-model-folder"
    settings = fake_settings(model=str(secret), keys=",".join(KEYS))
    app = create_app(settings, on_fatal=lambda: None)
    with TestClient(app) as client:
        for _ in range(2000):
            resp = client.get("/ready")
            if "failed" in resp.json()["message"]:
                break
        for path in ("/ready", "/"):
            anonymous = client.get(path)
            assert anonymous.status_code == 503
            assert "secret-model-folder" not in anonymous.text and "Retry-After" in anonymous.headers
        keyed = client.get("/ready", headers={"Authorization": f"Bearer {KEYS[1]}"})
        assert keyed.status_code == 503 and "secret-model-folder" in keyed.json()["message"]
        score = client.post(
            "/score", json={"input_data": {"data": ["a"]}}, headers={"Authorization": f"Bearer {KEYS[0]}"}
        )
        assert score.status_code == 503 and "Retry-After" in score.headers


def test_every_503_the_openapi_document_promises_carries_retry_after() -> None:
    """Breaks if ServiceUnavailable stops adding Retry-After (screening fail-closed had none)."""
    settings = fake_settings()

    class DownScreener:
        enabled = True

        def screen_prompts(self, prompts: Sequence[tuple[str, str | None]]) -> list[Verdict]:
            raise ScreeningUnavailable("Content screening is unavailable: emulated.")

        def screen_images(self, images: Sequence[bytes]) -> list[Verdict]:
            raise ScreeningUnavailable("Content screening is unavailable: emulated.")

        def close(self) -> None:
            pass

    app = create_app(settings, GenerationService(settings, FakeBackend(), DownScreener()), on_fatal=lambda: None)
    with TestClient(app) as client:
        wait_ready(client.get)
        doc = client.get("/openapi.json").json()
        promised = [
            (path, method)
            for path, item in doc["paths"].items()
            for method, op in item.items()
            if "Retry-After" in op.get("responses", {}).get("503", {}).get("headers", {})
        ]
        assert ("/score", "post") in promised and ("/ready", "get") in promised
        resp = client.post("/score", json={"input_data": {"data": ["a"]}, "parameters": {"num_inference_steps": 1}})
        assert resp.status_code == 503 and int(resp.headers["Retry-After"]) >= 1
        app.state.sd.begin_drain()
        for path, method in promised:
            drained = client.request(method.upper(), path, json={"input_data": {"data": ["a"]}})
            assert drained.status_code == 503 and int(drained.headers["Retry-After"]) >= 1, path


def test_access_log_lines_are_bounded(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    """Breaks if middleware._bounded is bypassed: a 100 kB path made a 200 kB log line."""
    with caplog.at_level(logging.INFO, logger="sd_endpoint.access"):
        resp = client.get("/" + "p" * 60_000)
        assert resp.status_code == 404
        long_key = json.dumps({"input_data": {"data": ["a"], "k" * 100_000: 1}})
        bad = client.post("/score", content=long_key.encode(), headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and len(bad.text) < 2_000
    lines = [r for r in caplog.records if r.name == "sd_endpoint.access"]
    assert len(lines) == 2
    for record in lines:
        assert len(record.getMessage()) < 2_000
        assert all(len(v) < 2_000 for v in vars(record).values() if isinstance(v, str))


def test_a_bad_member_never_enters_a_shared_call() -> None:
    """A prompt the model cannot encode is refused before it is queued, so nobody shares its failure."""
    app, backend = fake_app()
    with TestClient(app) as client:
        wait_ready(client.get)
        resp = client.post("/score", content=raw(r'{"input_data": {"data": ["ok", "\ud800"]}}'))
        assert resp.status_code == 400
    assert generated(backend) == []
