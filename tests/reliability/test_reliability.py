"""The reliability suite: fuzzing, load past capacity, a short soak, faults and security, over the real app
and uvicorn on loopback (FakeBackend for the model). Counts are kept small enough for a 2-core machine;
benchmarks/reliability.py runs the same scenarios larger and prints the README's table.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

from tests.reliability import scenarios
from tests.reliability.scenarios import FakeServer, fake_server
from tests.support.fakes import FakeBackend

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with fake_server(max_concurrent_requests=2, max_queued_requests=2, max_queue_wait_ms=50) as live:
        yield live


def test_fuzzed_bodies_get_2xx_or_4xx_json_never_5xx(server: FakeServer) -> None:
    fuzzed = scenarios.fuzz_score(server.url, examples=150)
    assert fuzzed.tried >= 150
    assert all(status < 500 for status in fuzzed.statuses)
    assert fuzzed.statuses[400] > 0  # the fuzzer does reach validation ...
    assert fuzzed.statuses[200] + fuzzed.statuses[429] > 0  # ... and past it


def test_schemathesis_over_the_openapi_document(server: FakeServer) -> None:
    fuzzed = scenarios.fuzz_openapi(server.url, examples_per_operation=15)
    assert fuzzed.tried >= 50
    assert all(status < 500 for status in fuzzed.statuses)
    assert sum(n for status, n in fuzzed.statuses.items() if status) >= 50  # answered by the server


def test_load_past_capacity_answers_each_request_once_with_its_own_image(server: FakeServer) -> None:
    load = scenarios.load_past_capacity(server, requests=60, concurrency=12)
    assert sum(load.statuses.values()) == 60 and load.metrics_match
    assert set(load.statuses) <= {200, 429, 408}
    assert load.statuses[200] >= 2 and load.statuses[429] >= 1  # past capacity, and still serving


def test_soak_keeps_memory_fds_and_threads_flat(server: FakeServer) -> None:
    soak = scenarios.soak(server, requests=600)
    assert soak.fds[1] - soak.fds[0] <= 5, soak
    assert soak.threads[1] - soak.threads[0] <= 5, soak
    assert soak.rss_mb[1] - soak.rss_mb[0] < 50, soak


def test_a_bad_member_fails_alone_and_its_batch_mates_run_once() -> None:
    with fake_server(max_concurrent_requests=4, max_batch_size=4) as live:
        outcome = scenarios.bad_member_in_merged_calls(live, rounds=3)
    assert outcome == {"failed alone": 3, "batch-mates answered": 6}


def test_clients_that_disconnect_stop_their_generation_and_free_their_slot() -> None:
    with fake_server() as live:
        assert scenarios.disconnects(live, clients=3) == {"stopped": 3}


def test_screening_down_slow_and_flapping() -> None:
    outcome = scenarios.screening_faults(rounds=2)
    assert outcome == {"down: 503 fail-closed": 2, "slow: retried, 200": 2, "flapping: retried, 200": 2}


def test_slow_body_connections_are_closed_after_the_read_timeout() -> None:
    """Breaks if read_body stops bounding the wait for each body chunk: the connections stay open."""
    with fake_server(body_read_timeout_s=1.0) as live:
        outcome = scenarios.slow_bodies(live, connections=20, read_timeout_s=1.0)
    assert outcome["408"] + outcome["closed"] == 20 and outcome["seconds"] < 30


def test_requests_the_http_parser_refuses_get_a_json_400(server: FakeServer) -> None:
    """Breaks if uvicorn_config stops passing http=JsonErrorsH11Protocol: uvicorn's plain-text 400 comes back."""
    assert scenarios.malformed_http(server) == {"400 JSON": len(scenarios.MALFORMED_HTTP)}


def test_past_the_connection_cap_a_json_503_with_retry_after() -> None:
    """Breaks if the protocol leaves uvicorn's own limit check on (plain text, no Retry-After)."""
    with fake_server(max_connections=4) as live:
        assert scenarios.connection_cap(live, limit=4) == {"503 JSON past the cap": 1, "200 once closed": 1}


def test_keys_and_prompts_stay_out_of_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    key = "reliability-secret-key-42"
    with caplog.at_level(logging.DEBUG), fake_server(keys=key) as live:
        headers = {"Authorization": f"Bearer {key}"}
        ok = httpx.post(f"{live.url}/score", json=scenarios.body("a private prompt", 1, 0), headers=headers)
        assert ok.status_code == 200
        wrong = httpx.post(f"{live.url}/score", json=scenarios.body("another private prompt", 1, 0))
        assert wrong.status_code == 401
        assert httpx.get(f"{live.url}/metrics", headers=headers).status_code == 200
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "sd_endpoint.access" in {r.name for r in caplog.records}  # the log lines were captured
    assert key not in text
    assert "private prompt" not in text


def test_the_fake_server_uses_the_production_uvicorn_config() -> None:
    backend = FakeBackend()
    with fake_server(backend, max_connections=7) as live:
        config = live._server.config
        assert config.limit_concurrency == 7 and config.server_header is False and config.access_log is False
