"""The AACS emulator over raw HTTP: shapes, limits, errors, authentication, policy, faults, CLI."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from aacs_emulator import DEFAULT_POLICY, AacsEmulator, Policy, PolicyError, image_fingerprint
from tests.safety.conftest import KEY, POLICY, png

TEXT = "/contentsafety/text:analyze?api-version=2023-10-01"
IMAGE = "/contentsafety/image:analyze?api-version=2023-10-01"
AUTH = {"Ocp-Apim-Subscription-Key": KEY}


def post(emu: AacsEmulator, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(emu.url + path, json=body, headers=AUTH if headers is None else headers, timeout=10)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def severities(resp: httpx.Response) -> dict[str, int]:
    return {item["category"]: item["severity"] for item in resp.json()["categoriesAnalysis"]}


def test_text_answer_has_the_service_shape(emulator: AacsEmulator) -> None:
    r = post(emulator, TEXT, {"text": "A Hexathorn and a crashmaul, with zeblor.", "blocklistNames": ["house-rules"]})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"blocklistsMatch", "categoriesAnalysis"}
    assert body["categoriesAnalysis"] == [
        {"category": "Hate", "severity": 4},
        {"category": "SelfHarm", "severity": 0},
        {"category": "Sexual", "severity": 0},
        {"category": "Violence", "severity": 4},
    ]
    (match,) = body["blocklistsMatch"]
    assert match["blocklistName"] == "house-rules" and match["blocklistItemText"] == "zeblor"
    assert match["blocklistItemId"]


def test_terms_match_whole_words_case_insensitively(emulator: AacsEmulator) -> None:
    assert severities(post(emulator, TEXT, {"text": "HEXATHORN!"}))["Hate"] == 4
    assert severities(post(emulator, TEXT, {"text": "hexathorns"}))["Hate"] == 0
    assert severities(post(emulator, TEXT, {"text": "a quux   phrase"}))["Hate"] == 0  # blocklists not asked for
    r = post(emulator, TEXT, {"text": "a QUUX   phrase", "blocklistNames": ["house-rules"]})
    assert [m["blocklistItemText"] for m in r.json()["blocklistsMatch"]] == ["quux phrase"]


def test_four_levels_round_down_and_eight_levels_do_not(emulator: AacsEmulator) -> None:
    assert severities(post(emulator, TEXT, {"text": "bruiseling"}))["Violence"] == 2
    r = post(emulator, TEXT, {"text": "bruiseling", "outputType": "EightSeverityLevels"})
    assert severities(r)["Violence"] == 3


def test_categories_filter_the_answer(emulator: AacsEmulator) -> None:
    r = post(emulator, TEXT, {"text": "ironfang", "categories": ["Violence", "Hate"]})
    assert r.json()["categoriesAnalysis"] == [
        {"category": "Violence", "severity": 6},
        {"category": "Hate", "severity": 0},
    ]


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        (TEXT, {}, 400, "InvalidRequestBody"),
        (TEXT, {"text": ""}, 400, "InvalidRequestBody"),
        (TEXT, {"text": 5}, 400, "InvalidRequestBody"),
        (TEXT, {"text": "x" * 10_001}, 400, "InvalidRequestBody"),
        (TEXT, {"text": "ok", "categories": ["Gore"]}, 400, "InvalidRequestBody"),
        (TEXT, {"text": "ok", "outputType": "TwoLevels"}, 400, "InvalidRequestBody"),
        (TEXT, {"text": "ok", "blocklistNames": ["missing"]}, 404, "ResourceNotFound"),
        (IMAGE, {"image": {}}, 400, "InvalidRequestBody"),
        (IMAGE, {"image": {"content": "aGk=", "blobUrl": "https://x/y.png"}}, 400, "InvalidRequestBody"),
        (IMAGE, {"image": {"blobUrl": "https://x/y.png"}}, 400, "InvalidRequestBody"),
        (IMAGE, {"image": {"content": "not base64!"}}, 400, "InvalidRequestBody"),
        (IMAGE, {"image": {"content": b64(b"not an image")}}, 400, "InvalidRequestBody"),
        (IMAGE, {"image": {"content": b64(png("red", (49, 64)))}}, 400, "InvalidRequestBody"),
        (IMAGE, {"image": {"content": b64(png("red", (2049, 64)))}}, 400, "InvalidRequestBody"),
        (
            IMAGE,
            {"image": {"content": b64(png("red"))}, "outputType": "EightSeverityLevels"},
            400,
            "InvalidRequestBody",
        ),
        ("/contentsafety/text:nope?api-version=2023-10-01", {"text": "x"}, 404, "404"),
    ],
)
def test_invalid_requests_get_the_service_error_body(
    emulator: AacsEmulator, path: str, body: Any, status: int, code: str
) -> None:
    r = post(emulator, path, body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    assert r.headers["x-ms-error-code"] == code


def test_text_at_the_limit_is_accepted(emulator: AacsEmulator) -> None:
    assert post(emulator, TEXT, {"text": "y" * 10_000}).status_code == 200


def test_image_over_4mb_is_refused(emulator: AacsEmulator) -> None:
    big = png("red") + b"\0" * (4 * 1024 * 1024)  # a PNG with trailing bytes still decodes
    r = post(emulator, IMAGE, {"image": {"content": b64(big)}})
    assert r.status_code == 400 and "too large" in r.json()["error"]["message"]


def test_body_that_is_not_json(emulator: AacsEmulator) -> None:
    r = httpx.post(emulator.url + TEXT, content=b"{nope", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidRequestBody"


@pytest.mark.parametrize(
    ("query", "code"),
    [("", "MissingApiVersionParameter"), ("?api-version=2023-04-30-preview", "UnsupportedApiVersion")],
)
def test_api_version_is_required(emulator: AacsEmulator, query: str, code: str) -> None:
    r = post(emulator, "/contentsafety/text:analyze" + query, {"text": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == code


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({}, "missing subscription key"),
        ({"Ocp-Apim-Subscription-Key": "wrong"}, "invalid subscription key"),
        ({"Authorization": "Bearer some-token"}, "invalid subscription key"),
    ],
)
def test_key_is_checked(emulator: AacsEmulator, headers: dict[str, str], fragment: str) -> None:
    r = post(emulator, TEXT, {"text": "x"}, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "401" and fragment in r.json()["error"]["message"]


def test_bearer_token_is_accepted_when_configured() -> None:
    with AacsEmulator(POLICY, token="tok-1") as emu:
        assert post(emu, TEXT, {"text": "x"}, headers={"Authorization": "Bearer tok-1"}).status_code == 200
        assert post(emu, TEXT, {"text": "x"}, headers={"Authorization": "Bearer tok-2"}).status_code == 401
        assert post(emu, TEXT, {"text": "x"}, headers={"Ocp-Apim-Subscription-Key": "tok-1"}).status_code == 401
        assert [(r.auth, r.status) for r in emu.requests] == [("bearer", 200), ("bearer", 401), ("key", 401)]


def test_without_configured_credentials_anyone_is_accepted() -> None:
    with AacsEmulator(POLICY) as emu:
        assert post(emu, TEXT, {"text": "x"}, headers={}).status_code == 200


def test_empty_policy_flags_nothing_and_no_policy_means_the_default() -> None:
    with AacsEmulator({}) as empty, AacsEmulator() as default:
        assert severities(post(empty, TEXT, {"text": "gore"}, headers={}))["Violence"] == 0
        assert severities(post(default, TEXT, {"text": "gore"}, headers={}))["Violence"] == 4


def test_image_rules_all_sha256_and_mean_colour() -> None:
    red, blue, grey = png((250, 10, 10)), png((10, 10, 250)), png((128, 128, 128))
    digest, _ = image_fingerprint(blue)
    policy = {
        "image": {
            "rules": [
                {"all": True, "severities": {"Hate": 2}},
                {"sha256": digest, "severities": {"Violence": 6}},
                {"mean_color": [255, 0, 0], "tolerance": 10, "severities": {"Sexual": 5}},
            ]
        }
    }
    with AacsEmulator(policy, key=KEY) as emu:
        found = [severities(post(emu, IMAGE, {"image": {"content": b64(d)}})) for d in (red, blue, grey)]
    assert found == [
        {"Hate": 2, "SelfHarm": 0, "Sexual": 4, "Violence": 0},  # 5 answered on the four-level scale
        {"Hate": 2, "SelfHarm": 0, "Sexual": 0, "Violence": 6},
        {"Hate": 2, "SelfHarm": 0, "Sexual": 0, "Violence": 0},
    ]


def test_mean_colour_tolerance_is_inclusive() -> None:
    policy = {"image": {"rules": [{"mean_color": [100, 100, 100], "tolerance": 5, "severities": {"Hate": 4}}]}}
    with AacsEmulator(policy) as emu:
        inside = post(emu, IMAGE, {"image": {"content": b64(png((105, 95, 100)))}}, headers={})
        outside = post(emu, IMAGE, {"image": {"content": b64(png((106, 100, 100)))}}, headers={})
    assert severities(inside)["Hate"] == 4 and severities(outside)["Hate"] == 0


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ([], "must be a JSON object"),
        ({"txt": {}}, "unknown keys"),
        ({"text": {"terms": [{"term": "a", "category": "Gore", "severity": 2}]}}, "text.terms[0].category"),
        ({"text": {"terms": [{"term": "a", "category": "Hate", "severity": 8}]}}, "text.terms[0].severity"),
        ({"text": {"terms": [{"category": "Hate", "severity": 2}]}}, "text.terms[0]"),
        ({"blocklists": {"bad name": ["x"]}}, "not a blocklist name"),
        ({"blocklists": {"ok": "x"}}, "blocklists.ok"),
        ({"image": {"rules": [{"severities": {"Hate": 2}}]}}, "exactly one of"),
        ({"image": {"rules": [{"all": True, "sha256": "0" * 64, "severities": {"Hate": 2}}]}}, "exactly one of"),
        ({"image": {"rules": [{"sha256": "abc", "severities": {"Hate": 2}}]}}, "image.rules[0].sha256"),
        ({"image": {"rules": [{"mean_color": [1, 2], "severities": {"Hate": 2}}]}}, "mean_color"),
        ({"image": {"rules": [{"all": True, "severities": {}}]}}, "image.rules[0].severities"),
    ],
)
def test_invalid_policies_name_the_problem(doc: Any, fragment: str) -> None:
    with pytest.raises(PolicyError, match=f".*{fragment.replace('[', '.').replace(']', '.')}"):
        Policy.from_dict(doc)


def test_policy_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text("{bad json")
    with pytest.raises(PolicyError, match="policy.json"):
        Policy.load(path)
    path.write_text(json.dumps(POLICY))
    assert len(Policy.load(path).terms) == len(POLICY["text"]["terms"])


def test_default_policy_is_valid_and_blocks_something() -> None:
    policy = Policy.default()
    assert policy.text_severities("so much gore")["Violence"] == 4
    assert policy.text_severities("a quiet lake")["Violence"] == 0


@pytest.mark.parametrize(
    ("mode", "status", "code"),
    [
        ("500", 500, "InternalError"),
        ("503", 503, "ServiceUnavailable"),
        ("429", 429, "TooManyRequests"),
        ("401", 401, "401"),
        ("403", 403, "403"),
    ],
)
def test_error_faults(emulator: AacsEmulator, mode: str, status: int, code: str) -> None:
    emulator.set_fault(mode, count=1)  # type: ignore[arg-type]
    r = post(emulator, TEXT, {"text": "x"})
    assert r.status_code == status and r.json()["error"]["code"] == code
    if mode == "429":
        assert r.headers["Retry-After"] == "1"
    assert post(emulator, TEXT, {"text": "x"}).status_code == 200  # count=1: the next call is fine


def test_down_fault_drops_the_connection(emulator: AacsEmulator) -> None:
    emulator.set_fault("down")
    with pytest.raises(httpx.TransportError):
        post(emulator, TEXT, {"text": "x"})
    emulator.clear_fault()
    assert post(emulator, TEXT, {"text": "x"}).status_code == 200


def test_slow_fault_delays_the_answer(emulator: AacsEmulator) -> None:
    emulator.set_fault("slow", delay_s=0.5)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(emulator.url + TEXT, json={"text": "x"}, headers=AUTH, timeout=0.1)


def test_faults_can_target_one_kind_and_be_set_over_http(emulator: AacsEmulator) -> None:
    r = httpx.post(emulator.url + "/emulator/faults", json={"mode": "500", "target": "image"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["fault"]["mode"] == "500"
    assert post(emulator, TEXT, {"text": "x"}).status_code == 200
    assert post(emulator, IMAGE, {"image": {"content": b64(png("red"))}}).status_code == 500
    assert httpx.delete(emulator.url + "/emulator/faults", headers=AUTH).json() == {"fault": None}
    assert post(emulator, IMAGE, {"image": {"content": b64(png("red"))}}).status_code == 200
    bad = httpx.post(emulator.url + "/emulator/faults", json={"mode": "418"}, headers=AUTH)
    assert bad.status_code == 400
    assert httpx.get(emulator.url + "/emulator/faults").status_code == 401  # admin routes need the key too


def test_requests_are_recorded_without_the_key(emulator: AacsEmulator) -> None:
    post(emulator, TEXT, {"text": "hello there", "blocklistNames": ["house-rules"]})
    post(emulator, IMAGE, {"image": {"content": b64(png("red", (80, 60)))}})
    post(emulator, TEXT, {"text": "x" * 10_001})
    text, image, too_long = emulator.requests
    assert (text.kind, text.status, text.auth, text.text) == ("text", 200, "key", "hello there")
    assert text.blocklist_names == ["house-rules"]
    assert (image.kind, image.image_size, image.image_format) == ("image", (80, 60), "PNG")
    assert too_long.status == 400
    listed = httpx.get(emulator.url + "/emulator/requests", headers=AUTH).json()
    assert [r["kind"] for r in listed] == ["text", "image", "text"] and listed[0]["text_length"] == 11
    assert KEY not in json.dumps(listed)
    httpx.delete(emulator.url + "/emulator/requests", headers=AUTH)
    assert emulator.requests == []


def test_policy_can_be_replaced_at_run_time(emulator: AacsEmulator) -> None:
    new = {"text": {"terms": [{"term": "hello", "category": "Sexual", "severity": 6}]}}
    assert httpx.put(emulator.url + "/emulator/policy", json=new, headers=AUTH).status_code == 200
    assert severities(post(emulator, TEXT, {"text": "hello"}))["Sexual"] == 6
    assert httpx.put(emulator.url + "/emulator/policy", json={"nope": 1}, headers=AUTH).status_code == 400


def test_cli_serves_until_terminated(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTENT_SAFETY_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aacs_emulator",
            "--port",
            "0",
            "--key",
            "cli-key",
            "--policy",
            str(policy),
            "--fault",
            "429",
            "--fault-target",
            "image",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("CONTENT_SAFETY_ENDPOINT=http://127.0.0.1:")
        url = line.split("=", 1)[1]
        r = httpx.post(url + TEXT, json={"text": "hexathorn"}, headers={"Ocp-Apim-Subscription-Key": "cli-key"})
        assert r.status_code == 200 and severities(r)["Hate"] == 4
        r = httpx.post(
            url + IMAGE, json={"image": {"content": b64(png("red"))}}, headers={"Ocp-Apim-Subscription-Key": "cli-key"}
        )
        assert r.status_code == 429
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_cli_prints_the_default_policy_and_rejects_a_bad_one(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "aacs_emulator", "--print-policy"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout) == DEFAULT_POLICY
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"text": {"terms": [{"term": "a", "category": "Hate", "severity": 9}]}}))
    res = subprocess.run(
        [sys.executable, "-m", "aacs_emulator", "--port", "0", "--policy", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "text.terms[0].severity" in res.stderr


def test_the_emulator_states_the_services_limits_as_the_screener_does() -> None:
    # Written twice on purpose (aacs_emulator.limits says why); this is where a difference shows.
    from aacs_emulator import limits
    from sd_endpoint.safety import preprocess

    for name in (
        "API_VERSION",
        "CATEGORIES",
        "OUTPUT_TYPES",
        "MAX_TEXT_CHARS",
        "MAX_IMAGE_BYTES",
        "MAX_IMAGE_SIDE",
        "MIN_IMAGE_SIDE",
    ):
        assert getattr(limits, name) == getattr(preprocess, name), name


def test_it_is_not_an_sd_endpoint_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    from sd_endpoint.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["aacs-emulator", "--print-policy"])
    assert exc.value.code == 2 and "invalid choice: 'aacs-emulator'" in capsys.readouterr().err
