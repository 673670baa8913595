"""AzureContentSafetyScreener: the real azure-ai-contentsafety SDK against the emulator on loopback."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from azure.core.credentials import AccessToken, AzureKeyCredential
from azure.core.exceptions import ClientAuthenticationError

from aacs_emulator import AacsEmulator
from sd_endpoint import metrics
from sd_endpoint.errors import ConfigError, ScreeningUnavailable
from sd_endpoint.safety import NullScreener, build_screener
from sd_endpoint.safety.aacs import AzureContentSafetyScreener
from sd_endpoint.safety.preprocess import chunk_text
from sd_endpoint.settings import ContentSafetySettings, load
from tests.safety.conftest import KEY, POLICY, ScreenerFactory, png
from tests.support.net import free_port


class FakeTokenCredential:
    """A TokenCredential that hands out a fixed token and counts the calls."""

    def __init__(self, token: str = "entra-token-1", fail: bool = False) -> None:
        self.token, self.fail, self.scopes = token, fail, []  # type: ignore[var-annotated]

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        if self.fail:
            raise ClientAuthenticationError("no identity here")
        return AccessToken(self.token, int(time.time()) + 3600)


# --- verdicts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "category", "severity"),
    [("hexathorn", "Hate", 4), ("sorrowvine", "SelfHarm", 4), ("velvetine", "Sexual", 4), ("crashmaul", "Violence", 4)],
)
def test_each_category_blocks(make_screener: ScreenerFactory, word: str, category: str, severity: int) -> None:
    (verdict,) = make_screener().screen_prompts([(f"a {word} in the park", None)])
    assert verdict.blocked and verdict.stage == "prompt"
    assert verdict.blocked_categories == {category: severity}
    assert verdict.severities[category] == severity
    assert set(verdict.severities) == {"Hate", "SelfHarm", "Sexual", "Violence"}
    assert verdict.as_record() == {"stage": "prompt", "categories": {category: severity}}


def test_safe_prompt_passes_with_all_severities(make_screener: ScreenerFactory) -> None:
    (verdict,) = make_screener().screen_prompts([("a lighthouse at dawn", "blurry")])
    assert not verdict.blocked and verdict.blocked_categories == {} and verdict.blocklist_hits == ()
    assert verdict.severities == {"Hate": 0, "SelfHarm": 0, "Sexual": 0, "Violence": 0}


def test_severity_equal_to_the_threshold_blocks_and_one_below_passes(make_screener: ScreenerFactory) -> None:
    # "grumblewick" is Hate 2 and "bruiseling" Violence 3 (eight-level scale).
    at_two = make_screener(threshold=2)
    at_three = make_screener(threshold=3)
    eight = make_screener(threshold=3, output_type="EightSeverityLevels")
    assert at_two.screen_prompts([("grumblewick", None)])[0].blocked_categories == {"Hate": 2}
    assert not at_three.screen_prompts([("grumblewick", None)])[0].blocked
    assert eight.screen_prompts([("bruiseling", None)])[0].blocked_categories == {"Violence": 3}
    assert not eight.screen_prompts([("grumblewick", None)])[0].blocked  # 2 < 3


def test_per_category_overrides(make_screener: ScreenerFactory) -> None:
    screener = make_screener(threshold=4, threshold_violence=6, threshold_hate=2)
    verdicts = screener.screen_prompts([("crashmaul", None), ("ironfang", None), ("grumblewick", None)])
    assert [v.blocked for v in verdicts] == [False, True, True]  # Violence 4 < 6; Violence 6; Hate 2 >= 2
    assert verdicts[1].blocked_categories == {"Violence": 6}
    assert screener.thresholds == {"Hate": 2, "SelfHarm": 4, "Sexual": 4, "Violence": 6}


def test_thresholds_not_given_are_two(emulator: AacsEmulator) -> None:
    # Built directly (benchmarks, embedding applications), not from settings, which name every category.
    screener = AzureContentSafetyScreener(emulator.url, AzureKeyCredential(KEY), thresholds={"self_harm": 5})
    try:
        assert screener.thresholds == {"Hate": 2, "SelfHarm": 5, "Sexual": 2, "Violence": 2}
    finally:
        screener.close()


def test_negative_prompt_is_screened_and_severities_are_the_maximum(make_screener: ScreenerFactory) -> None:
    (verdict,) = make_screener().screen_prompts([("a grumblewick", "crashmaul, hexathorn")])
    assert verdict.blocked_categories == {"Hate": 4, "Violence": 4}


def test_blocklist_hit_blocks_and_names_the_list(make_screener: ScreenerFactory, emulator: AacsEmulator) -> None:
    screener = make_screener(blocklists="house-rules")
    clean, hit = screener.screen_prompts([("a plain prompt", None), ("a quux phrase here", None)])
    assert not clean.blocked
    assert hit.blocked and hit.blocked_categories == {} and hit.blocklist_hits == ("house-rules",)
    assert hit.as_record() == {"stage": "prompt", "categories": {}, "blocklists": ["house-rules"]}
    assert all(r.blocklist_names == ["house-rules"] for r in emulator.requests)


def test_unknown_blocklist_makes_screening_unavailable(make_screener: ScreenerFactory) -> None:
    with pytest.raises(ScreeningUnavailable, match="CONTENT_SAFETY_BLOCKLISTS"):
        make_screener(blocklists="no-such-list").screen_prompts([("x", None)])


def test_long_text_is_screened_in_chunks(make_screener: ScreenerFactory, emulator: AacsEmulator) -> None:
    filler = " ".join(f"meadow{i}" for i in range(2400))  # 24,289 characters, no two chunks alike
    prompt = filler + " crashmaul"  # the only unsafe word, in the last chunk
    (verdict,) = make_screener().screen_prompts([(prompt, None)])
    assert verdict.blocked_categories == {"Violence": 4}
    texts = [r.text or "" for r in emulator.requests]
    assert len(texts) == 3 and all(len(t) <= 10_000 for t in texts) and sum(map(len, texts)) >= len(prompt)
    assert sorted(texts, key=prompt.index) == chunk_text(prompt)
    assert all(r.status == 200 for r in emulator.requests)


def test_identical_texts_are_screened_once(make_screener: ScreenerFactory, emulator: AacsEmulator) -> None:
    rows = [("a cat", "blurry"), ("a dog", "blurry"), ("a cat", "blurry")]
    verdicts = make_screener().screen_prompts(rows)
    assert len(verdicts) == 3 and not any(v.blocked for v in verdicts)
    assert sorted(r.text or "" for r in emulator.requests) == ["a cat", "a dog", "blurry"]


def test_images_are_screened_and_oversized_ones_as_a_fitted_copy(
    make_screener: ScreenerFactory, emulator: AacsEmulator
) -> None:
    emulator.policy = type(emulator.policy).from_dict(
        {"image": {"rules": [{"mean_color": [250, 10, 10], "tolerance": 4, "severities": {"Violence": 6}}]}}
    )
    red, blue, wide_red, tiny_blue = (
        png((250, 10, 10)),
        png((10, 10, 250)),
        png((250, 10, 10), (3000, 200)),
        png((10, 10, 250), (30, 30)),
    )
    before = metrics.SCREENING_IMAGES_ADAPTED._value.get()
    verdicts = make_screener().screen_images([red, blue, wide_red, tiny_blue])
    assert [v.blocked for v in verdicts] == [True, False, True, False]
    assert verdicts[0].stage == "image" and verdicts[0].blocked_categories == {"Violence": 6}
    sizes = sorted(r.image_size for r in emulator.requests if r.image_size)
    assert sizes == [(50, 50), (64, 64), (64, 64), (2048, 136)]
    assert metrics.SCREENING_IMAGES_ADAPTED._value.get() - before == 2


def test_calls_run_concurrently(make_screener: ScreenerFactory, emulator: AacsEmulator) -> None:
    emulator.set_fault("slow", delay_s=0.5)  # every call is held long enough for the others to arrive
    make_screener().screen_prompts([(f"prompt {i}", f"negative {i}") for i in range(6)])  # 12 calls
    assert len(emulator.requests) == 12
    assert emulator.max_in_flight >= 6  # one at a time would give 1
    emulator.clear_requests()
    make_screener(max_concurrency=2).screen_prompts([(f"prompt {i}", None) for i in range(4)])
    assert emulator.max_in_flight == 2  # bounded by CONTENT_SAFETY_MAX_CONCURRENCY


def test_answer_missing_a_category_is_not_read_as_safe(
    make_screener: ScreenerFactory, emulator: AacsEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = emulator.analyze_text

    def partial(body: Any, record: Any) -> dict[str, Any]:
        out = real(body, record)
        out["categoriesAnalysis"] = out["categoriesAnalysis"][:2]
        return out

    monkeypatch.setattr(emulator, "analyze_text", partial)
    with pytest.raises(ScreeningUnavailable, match="no severity for Sexual, Violence"):
        make_screener().screen_prompts([("x", None)])


# --- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "fragment"),
    [
        ("down", "connection to Azure AI Content Safety at 127.0.0.1"),
        ("500", "HTTP 500 InternalError"),
        ("503", "HTTP 503 ServiceUnavailable"),
        ("429", "throttling requests (HTTP 429)"),
        ("401", "rejected the key (CONTENT_SAFETY_KEY) (HTTP 401)"),
        ("403", "rejected the key (CONTENT_SAFETY_KEY) (HTTP 403)"),
    ],
)
@pytest.mark.parametrize("stage", ["text", "image"])
def test_failures_raise_screening_unavailable(
    make_screener: ScreenerFactory,
    emulator: AacsEmulator,
    mode: str,
    fragment: str,
    stage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    emulator.set_fault(mode, target=stage)  # type: ignore[arg-type]
    screener = make_screener()
    with caplog.at_level(logging.DEBUG), pytest.raises(ScreeningUnavailable) as info:
        if stage == "text":
            screener.screen_prompts([("a cat", None), ("a dog", None)])
        else:
            screener.screen_images([png("red")])
    assert info.value.status_code == 503
    assert info.value.message.startswith("Content screening is unavailable: ")
    assert fragment in info.value.message
    assert KEY not in info.value.message and KEY not in caplog.text


def test_timeout(make_screener: ScreenerFactory, emulator: AacsEmulator) -> None:
    emulator.set_fault("slow", delay_s=2)
    with pytest.raises(ScreeningUnavailable, match=r"did not answer within 0.2 s"):
        make_screener(timeout_s=0.2).screen_prompts([("a cat", None)])


def test_connection_refused() -> None:
    port = free_port()  # nothing listens there
    screener = AzureContentSafetyScreener.from_settings(
        ContentSafetySettings(endpoint=f"http://127.0.0.1:{port}", key=KEY, retries=0)
    )
    try:
        with pytest.raises(
            ScreeningUnavailable, match=f"cannot connect to Azure AI Content Safety at 127.0.0.1:{port}"
        ):
            screener.screen_prompts([("a cat", None)])
    finally:
        screener.close()


def test_wrong_key(make_screener: ScreenerFactory) -> None:
    with pytest.raises(ScreeningUnavailable, match=r"rejected the key \(CONTENT_SAFETY_KEY\) \(HTTP 401\)") as info:
        make_screener(key="not-the-key").screen_prompts([("a cat", None)])
    assert "not-the-key" not in info.value.message


def test_retries_recover_from_a_transient_failure(make_screener: ScreenerFactory, emulator: AacsEmulator) -> None:
    emulator.set_fault("503", count=1)
    (verdict,) = make_screener(retries=1).screen_prompts([("hexathorn", None)])
    assert verdict.blocked
    assert [r.status for r in emulator.requests] == [503, 200]


def test_429_retry_after_is_honoured_then_reported(make_screener: ScreenerFactory, emulator: AacsEmulator) -> None:
    emulator.set_fault("429", retry_after_s=0)
    with pytest.raises(ScreeningUnavailable, match=r"HTTP 429\) after 2 retries"):
        make_screener(retries=2).screen_prompts([("a cat", None)])
    assert [r.status for r in emulator.requests] == [429, 429, 429]


# --- credentials ---------------------------------------------------------------------------------


def test_token_credential_sends_a_bearer_token() -> None:
    credential = FakeTokenCredential("entra-token-1")
    with AacsEmulator(POLICY, token="entra-token-1") as emu:
        screener = AzureContentSafetyScreener.from_settings(
            ContentSafetySettings(endpoint=emu.url, retries=0), credential=credential
        )
        try:
            assert screener.screen_prompts([("hexathorn", None)])[0].blocked
            assert not screener.screen_images([png("red")])[0].blocked
        finally:
            screener.close()
        assert [r.auth for r in emu.requests] == ["bearer", "bearer"]
    assert ("https://cognitiveservices.azure.com/.default",) in credential.scopes


def test_key_wins_over_a_token_credential(make_screener: ScreenerFactory, emulator: AacsEmulator) -> None:
    make_screener(credential=FakeTokenCredential()).screen_prompts([("a cat", None)])
    assert [r.auth for r in emulator.requests] == ["key"]


def test_rejected_token(emulator: AacsEmulator) -> None:
    screener = AzureContentSafetyScreener.from_settings(
        ContentSafetySettings(endpoint=emulator.url, retries=0), credential=FakeTokenCredential("wrong-token")
    )
    try:
        with pytest.raises(ScreeningUnavailable, match=r"rejected the token .*HTTP 401"):
            screener.screen_prompts([("a cat", None)])
    finally:
        screener.close()


def test_managed_identity_is_used_with_uai_client_id(monkeypatch: pytest.MonkeyPatch, emulator: AacsEmulator) -> None:
    import azure.identity

    made: list[str] = []

    class FakeManagedIdentity(FakeTokenCredential):
        def __init__(self, *, client_id: str) -> None:
            made.append(client_id)
            super().__init__("mi-token")

    monkeypatch.setattr(azure.identity, "ManagedIdentityCredential", FakeManagedIdentity)
    with AacsEmulator(POLICY, token="mi-token") as emu:
        screener = AzureContentSafetyScreener.from_settings(
            ContentSafetySettings(endpoint=emu.url, retries=0, uai_client_id="1111-2222")
        )
        try:
            assert not screener.screen_prompts([("a cat", None)])[0].blocked
        finally:
            screener.close()
    assert made == ["1111-2222"]


# --- start-up configuration ----------------------------------------------------------------------


def test_no_endpoint_means_no_screening() -> None:
    assert isinstance(build_screener(ContentSafetySettings(endpoint=None)), NullScreener)
    assert isinstance(build_screener(ContentSafetySettings(endpoint="")), NullScreener)


def test_endpoint_trailing_slashes_are_stripped(make_screener: ScreenerFactory, emulator: AacsEmulator) -> None:
    screener = make_screener(endpoint=emulator.url + "//")
    assert screener.endpoint == emulator.url
    assert not screener.screen_prompts([("a cat", None)])[0].blocked  # a double slash would be a 404


@pytest.mark.parametrize(
    ("endpoint", "fragment"),
    [
        ("not a url", "must be an http(s) URL"),
        ("ftp://example.com", "must be an http(s) URL"),
        ("https://", "must be an http(s) URL"),
        ("https://example.com:99999", "is not a valid URL"),
        ("https://example.com/?x=1", "must not contain a query"),
        ("https://user:pw@example.com", "must not contain a user name"),
    ],
)
def test_malformed_endpoint_fails_at_start_up(endpoint: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match="CONTENT_SAFETY_ENDPOINT") as info:
        build_screener(ContentSafetySettings(endpoint=endpoint, key=KEY))
    assert fragment in str(info.value)
    assert "pw" not in str(info.value)


def test_no_credential_available_fails_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    import azure.identity

    class NoIdentity(FakeTokenCredential):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(fail=True)

    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", NoIdentity)
    with pytest.raises(ConfigError) as info:
        build_screener(ContentSafetySettings(endpoint="https://res.cognitiveservices.azure.com"))
    message = str(info.value)
    assert "CONTENT_SAFETY_ENDPOINT is set but no credential is available" in message
    assert "CONTENT_SAFETY_KEY" in message and "UAI_CLIENT_ID" in message and "no identity here" in message


def test_failing_injected_credential_fails_at_start_up() -> None:
    with pytest.raises(ConfigError, match="FakeTokenCredential"):
        AzureContentSafetyScreener.from_settings(
            ContentSafetySettings(endpoint="https://res.cognitiveservices.azure.com"),
            credential=FakeTokenCredential(fail=True),
        )


def test_token_over_plain_http_off_this_machine_is_refused() -> None:
    with pytest.raises(ConfigError, match="CONTENT_SAFETY_ENDPOINT: Entra ID tokens are only sent over https"):
        AzureContentSafetyScreener.from_settings(
            ContentSafetySettings(endpoint="http://aacs.internal:8080"), credential=FakeTokenCredential()
        )


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"CONTENT_SAFETY_THRESHOLD": "9"}, "CONTENT_SAFETY_THRESHOLD:"),
        ({"CONTENT_SAFETY_THRESHOLD": "0"}, "CONTENT_SAFETY_THRESHOLD:"),
        ({"CONTENT_SAFETY_THRESHOLD": "high"}, "CONTENT_SAFETY_THRESHOLD:"),
        ({"CONTENT_SAFETY_THRESHOLD_VIOLENCE": "8"}, "CONTENT_SAFETY_THRESHOLD_VIOLENCE"),
        ({"CONTENT_SAFETY_THRESHOLD_SELF_HARM": "-1"}, "CONTENT_SAFETY_THRESHOLD_SELF_HARM"),
        ({"CONTENT_SAFETY_BLOCKLISTS": "ok,not ok"}, "CONTENT_SAFETY_BLOCKLISTS"),
        ({"CONTENT_SAFETY_OUTPUT_TYPE": "TwoLevels"}, "CONTENT_SAFETY_OUTPUT_TYPE"),
        ({"CONTENT_SAFETY_TIMEOUT_S": "0"}, "CONTENT_SAFETY_TIMEOUT_S"),
        ({"CONTENT_SAFETY_RETRIES": "-1"}, "CONTENT_SAFETY_RETRIES"),
    ],
)
def test_bad_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], fragment: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=fragment):
        load(ContentSafetySettings)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "CONTENT_SAFETY_ENDPOINT": "https://res.cognitiveservices.azure.com/",
        "CONTENT_SAFETY_KEY": "k",
        "CONTENT_SAFETY_THRESHOLD": "4",
        "CONTENT_SAFETY_THRESHOLD_SELFHARM": "2",
        "CONTENT_SAFETY_BLOCKLISTS": "a, b.c",
        "CONTENT_SAFETY_FAIL_OPEN": "true",
        "UAI_CLIENT_ID": "cid",
    }.items():
        monkeypatch.setenv(name, value)
    settings = load(ContentSafetySettings)
    assert settings.thresholds() == {"Hate": 4, "SelfHarm": 2, "Sexual": 4, "Violence": 4}
    assert settings.blocklists == ["a", "b.c"] and settings.fail_open and settings.uai_client_id == "cid"
    screener = build_screener(settings)
    try:
        assert isinstance(screener, AzureContentSafetyScreener)
        assert screener.endpoint == "https://res.cognitiveservices.azure.com" and screener.uses_key
    finally:
        screener.close()


def test_a_timed_out_call_is_retried(make_screener: ScreenerFactory, emulator: AacsEmulator) -> None:
    # azure-core never retries a POST after a read timeout; our policy must, as the 503 message says.
    emulator.set_fault("slow", delay_s=3, count=1)
    (verdict,) = make_screener(timeout_s=0.5, retries=1).screen_prompts([("hexathorn", None)])
    assert verdict.blocked
    assert sum(1 for r in emulator.requests if r.status == 200 and r.kind == "text") >= 1


def test_timeouts_exhaust_the_retries_the_message_names(make_screener: ScreenerFactory, emulator: AacsEmulator) -> None:
    emulator.set_fault("slow", delay_s=3)
    started = time.monotonic()
    with pytest.raises(ScreeningUnavailable, match=r"did not answer within 0.3 s after 1 retry"):
        make_screener(timeout_s=0.3, retries=1).screen_prompts([("a cat", None)])
    assert time.monotonic() - started >= 0.6  # two attempts, each waited for its full timeout
