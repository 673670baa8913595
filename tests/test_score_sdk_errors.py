"""score.py's timeout answer, read through azure-ai-ml's own error mapping (the code behind
``ml_client.online_endpoints.invoke``), offline: our response is replayed by a loopback HTTP server and fetched
with azure-core, then handed to the SDK's ``validate_response``."""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_score() -> ModuleType:
    spec = importlib.util.spec_from_file_location("score_under_test", REPO / "score.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class JumpingClock:
    """``time`` for sd_endpoint.jobs whose monotonic clock moves 60 s per reading: the deadline passes at once."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 60.0
        return self.now


def score_response(service: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[int, bytes]:
    from flask import Request  # what azmlinfsrv hands a @rawhttp run()
    from werkzeug.test import EnvironBuilder

    from sd_endpoint import jobs

    score = load_score()
    monkeypatch.setattr(score, "_service", service)
    monkeypatch.setattr(jobs, "time", JumpingClock())
    body = {"input_data": {"data": ["a red fox"]}, "parameters": {"num_inference_steps": 3, "height": 64, "width": 64}}
    environ = EnvironBuilder(
        method="POST", path="/score", data=json.dumps(body), headers={"Content-Type": "application/json"}
    ).get_environ()
    response = score.run(Request(environ))
    return response.status_code, response.get_data()


@pytest.fixture
def replay() -> Iterator[tuple[dict[str, Any], str]]:
    """A loopback server answering every POST with the status and JSON body put in the dict."""
    answer: dict[str, Any] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(answer["status"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer["body"])))
            self.end_headers()
            self.wfile.write(answer["body"])

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield answer, f"http://127.0.0.1:{server.server_address[1]}/score"
    finally:
        server.shutdown()
        server.server_close()


def sdk_error(url: str) -> BaseException:
    """What ml_client.online_endpoints.invoke raises for this answer (its post, then validate_response)."""
    from azure.ai.ml._utils._endpoint_utils import validate_response
    from azure.core import PipelineClient
    from azure.core.rest import HttpRequest

    client = PipelineClient(base_url=url)
    response = client.send_request(HttpRequest("POST", url, json={"input_data": {"data": ["x"]}}))
    try:
        validate_response(response)
    except BaseException as exc:  # noqa: BLE001 - whatever the SDK raises is the subject here
        return exc
    raise AssertionError("validate_response accepted an error status")


def test_timeout_reads_cleanly_through_azure_ai_ml(
    service: Any, monkeypatch: pytest.MonkeyPatch, replay: tuple[dict[str, Any], str]
) -> None:
    from azure.core.exceptions import HttpResponseError

    status, body = score_response(service, monkeypatch)
    assert status == 500  # azmlinfsrv's own status for a scoring timeout
    message = json.loads(body)["message"]
    assert message.startswith("Scoring timeout: Generation stopped after")

    answer, url = replay
    answer.update(status=status, body=body)
    error = sdk_error(url)
    assert isinstance(error, HttpResponseError) and error.status_code == 500
    assert "Scoring timeout: Generation stopped after" in str(error)

    # Why not 408: the same body with 408 makes the SDK fail inside its own error handling.
    answer.update(status=408)
    assert isinstance(sdk_error(url), TypeError)
