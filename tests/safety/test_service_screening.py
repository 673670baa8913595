"""Screening inside GenerationService: the tiny model, the real SDK, the emulator on loopback."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from PIL import Image

from aacs_emulator import AacsEmulator, Policy
from sd_endpoint import metrics
from sd_endpoint.errors import ScreeningUnavailable
from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask
from sd_endpoint.service import SAFETY_HEADER, GenerationService, ScoreResult
from tests.conftest import small_request
from tests.safety.conftest import ScreenerFactory
from tests.support.net import free_port

SAFE = ["a red fox in the snow", "a blue whale", "a green forest"]
UNSAFE = "a hexathorn at night"  # Hate 4 in the test policy


class Spy:
    """A ``generate`` seam that records what the backend was asked for."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.calls: list[list[ImageTask]] = []

    def __call__(self, spec: GenerationSpec, tasks: Sequence[ImageTask], cancel: CancelToken | None) -> BatchResult:
        self.calls.append(list(tasks))
        result: BatchResult = self.backend.generate(spec, tasks, cancel)
        return result


@pytest.fixture
def make_service(settings: Any, backend: Any) -> Iterator[Callable[..., GenerationService]]:
    made: list[GenerationService] = []

    def make(screener: Any = None, fail_open: bool = False) -> GenerationService:
        svc = GenerationService(settings, backend, screener, fail_open=fail_open)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.close()


def image_bytes(record: dict[str, Any]) -> bytes:
    return base64.b64decode(record["generated_image"])


def mean_colour(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)


def counter(metric: Any, *labels: str) -> float:
    value: float = (metric.labels(*labels) if labels else metric)._value.get()
    return value


def test_safe_and_unsafe_prompts_and_images_in_one_request(
    make_service: Callable[..., GenerationService],
    make_screener: ScreenerFactory,
    emulator: AacsEmulator,
    backend: Any,
) -> None:
    # 1. Unscreened, the same tasks the screened request will generate: the images to block are known.
    plain = make_service().handle(small_request(SAFE, num_images_per_prompt=2))
    images = {(r["prompt"], r["seed"]): image_bytes(r) for r in plain.records}
    whale_1 = images[("a blue whale", 1)]
    forest_2 = images[("a green forest", 2)]
    others = [data for data in images.values() if data is not forest_2]
    gap = min(float(np.abs(mean_colour(forest_2) - mean_colour(o)).max()) for o in others)
    assert gap > 0.2  # the mean-colour rule can single the forest image out
    emulator.policy = Policy.from_dict(
        {
            "text": {"terms": [{"term": "hexathorn", "category": "Hate", "severity": 4}]},
            "image": {
                "rules": [
                    {"sha256": hashlib.sha256(whale_1).hexdigest(), "severities": {"Violence": 6}},
                    {"mean_color": mean_colour(forest_2).tolist(), "tolerance": gap / 2, "severities": {"Sexual": 4}},
                ]
            },
        }
    )

    # 2. Screened: the unsafe prompt row is never generated; two images are blocked by the image stage.
    svc = make_service(make_screener())
    spy = Spy(backend)
    blocked_prompt = counter(metrics.BLOCKED, "prompt", "Hate")
    blocked_image = counter(metrics.BLOCKED, "image", "Violence")
    result: ScoreResult = svc.score(
        svc.parse(small_request([SAFE[0], UNSAFE, *SAFE[1:]], num_images_per_prompt=2)), generate=spy
    )
    assert [[t.prompt for t in call] for call in spy.calls] == [[p for p in SAFE for _ in range(2)]]
    assert result.images == 6 and result.blocked == 4
    assert result.headers[SAFETY_HEADER] == "screened"
    by_key = {(r["prompt"], r["seed"]): r for r in result.records}
    assert [r["prompt"] for r in result.records] == [p for p in [SAFE[0], UNSAFE, *SAFE[1:]] for _ in range(2)]

    for seed in (1, 2):
        row = by_key[(UNSAFE, seed)]
        assert row["generated_image"] == "" and row["nsfw_content_detected"] is True
        assert row["blocked"] == {"stage": "prompt", "categories": {"Hate": 4}}
    whale = by_key[("a blue whale", 1)]
    assert whale["generated_image"] == "" and whale["nsfw_content_detected"] is True
    assert whale["blocked"] == {"stage": "image", "categories": {"Violence": 6}}
    forest = by_key[("a green forest", 2)]
    assert forest["generated_image"] == "" and forest["nsfw_content_detected"] is True
    assert forest["blocked"] == {"stage": "image", "categories": {"Sexual": 4}}
    for key in [(SAFE[0], 1), (SAFE[0], 2), ("a blue whale", 2), ("a green forest", 1)]:
        record = by_key[key]
        assert record["nsfw_content_detected"] is False and "blocked" not in record
        assert image_bytes(record) == images[key]  # the user gets exactly the generated image
    assert counter(metrics.BLOCKED, "prompt", "Hate") - blocked_prompt == 1
    assert counter(metrics.BLOCKED, "image", "Violence") - blocked_image == 1
    # Four prompts (one call each; no negative prompt) and six images were screened.
    assert sorted(r.kind for r in emulator.requests) == ["image"] * 6 + ["text"] * 4


def test_request_with_every_prompt_blocked_generates_nothing(
    make_service: Callable[..., GenerationService], make_screener: ScreenerFactory, backend: Any
) -> None:
    svc = make_service(make_screener())
    spy = Spy(backend)
    result = svc.score(svc.parse(small_request([UNSAFE, "a crashmaul"])), generate=spy)
    assert spy.calls == [] and result.images == 0 and result.blocked == 2
    assert [r["blocked"]["categories"] for r in result.records] == [{"Hate": 4}, {"Violence": 4}]


def test_negative_prompt_is_screened_too(
    make_service: Callable[..., GenerationService], make_screener: ScreenerFactory
) -> None:
    svc = make_service(make_screener())
    body = small_request(["a calm lake", "a quiet street"])
    body["input_data"] = {
        "columns": ["prompt", "negative_prompt"],
        "data": [{"prompt": "a calm lake", "negative_prompt": "velvetine"}, {"prompt": "a quiet street"}],
    }
    lake, street = svc.handle(body).records
    assert lake["blocked"] == {"stage": "prompt", "categories": {"Sexual": 4}} and lake["generated_image"] == ""
    assert street["nsfw_content_detected"] is False and street["generated_image"]


def test_long_prompt_is_screened_in_chunks(
    make_service: Callable[..., GenerationService], make_screener: ScreenerFactory, emulator: AacsEmulator
) -> None:
    prompt = " ".join(f"meadow{i}" for i in range(1500)) + " ironfang"  # 15,299 characters
    (record,) = make_service(make_screener()).handle(small_request([prompt])).records
    assert record["blocked"] == {"stage": "prompt", "categories": {"Violence": 6}}
    sizes = [len(r.text or "") for r in emulator.requests]
    assert len(sizes) == 2 and max(sizes) <= 10_000 and sum(sizes) >= len(prompt)


@pytest.mark.slow
def test_image_over_the_size_limit_is_screened_as_a_copy_and_returned_whole(
    make_service: Callable[..., GenerationService], make_screener: ScreenerFactory, emulator: AacsEmulator
) -> None:
    (record,) = make_service(make_screener()).handle(small_request(["a long panorama"], width=2112)).records
    assert record["nsfw_content_detected"] is False
    with Image.open(io.BytesIO(image_bytes(record))) as im:
        assert im.size == (2112, 64)
    (call,) = [r for r in emulator.requests if r.kind == "image"]
    assert call.status == 200 and call.image_size == (2048, 62)


# --- failures: fail closed by default, fail open when asked --------------------------------------

# (mode, stage): every fault at each stage; a refused connection can only fail the first (text) stage.
FAILURES = [(m, s) for m in ("down", "slow", "500", "503", "429", "401", "403") for s in ("text", "image")]
FAILURES.append(("refused", "text"))


def break_emulator(emulator: AacsEmulator, mode: str, stage: str) -> dict[str, Any]:
    """Make the chosen stage fail; returns settings overrides for the screener."""
    if mode == "refused":
        return {"endpoint": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    emulator.set_fault(mode, target=stage, delay_s=2.0)  # type: ignore[arg-type]
    return {"timeout_s": 0.3} if mode == "slow" else {}


@pytest.mark.parametrize(("mode", "stage"), FAILURES)
def test_fail_closed(
    make_service: Callable[..., GenerationService],
    make_screener: ScreenerFactory,
    emulator: AacsEmulator,
    backend: Any,
    mode: str,
    stage: str,
) -> None:
    svc = make_service(make_screener(**break_emulator(emulator, mode, stage)))
    spy = Spy(backend)
    with pytest.raises(ScreeningUnavailable) as info:
        svc.score(svc.parse(small_request(SAFE[:2])), generate=spy)
    assert info.value.status_code == 503
    assert info.value.body() == {"message": info.value.message}
    assert info.value.message.startswith("Content screening is unavailable")
    # A failed prompt stage generates nothing; a failed image stage returns nothing.
    assert len(spy.calls) == (0 if stage == "text" else 1)


@pytest.mark.parametrize(("mode", "stage"), FAILURES)
def test_fail_open(
    make_service: Callable[..., GenerationService],
    make_screener: ScreenerFactory,
    emulator: AacsEmulator,
    mode: str,
    stage: str,
) -> None:
    svc = make_service(make_screener(**break_emulator(emulator, mode, stage)), fail_open=True)
    skipped = counter(metrics.SCREENING_SKIPPED)
    result = svc.handle(small_request(SAFE[:2]))
    assert result.headers[SAFETY_HEADER] == "skipped"
    assert counter(metrics.SCREENING_SKIPPED) - skipped == 1
    assert len(result.records) == 2
    for record in result.records:
        assert record["nsfw_content_detected"] is None and "blocked" not in record
        assert image_bytes(record).startswith(b"\x89PNG")


def test_fail_open_after_the_prompt_stage_still_blocks_blocked_prompts(
    make_service: Callable[..., GenerationService], make_screener: ScreenerFactory, emulator: AacsEmulator
) -> None:
    emulator.set_fault("500", target="image")
    result = make_service(make_screener(), fail_open=True).handle(small_request([SAFE[0], UNSAFE]))
    safe, unsafe = result.records
    assert result.headers[SAFETY_HEADER] == "skipped"
    assert safe["nsfw_content_detected"] is None and safe["generated_image"]
    assert unsafe["nsfw_content_detected"] is True and unsafe["generated_image"] == ""
    assert unsafe["blocked"]["stage"] == "prompt"


def test_prompts_are_not_logged_unless_asked(
    make_service: Callable[..., GenerationService], make_screener: ScreenerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        make_service(make_screener()).handle(small_request([UNSAFE]))
    assert "blocked prompt 0" in caplog.text and "hexathorn" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        make_service(make_screener(log_prompts=True)).handle(small_request([UNSAFE]))
    assert any(UNSAFE in str(getattr(r, "screening", "")) for r in caplog.records)
