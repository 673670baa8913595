"""The core service on the real tiny model: fidelity to plain diffusers, determinism, records, stopping."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sd_endpoint.errors import GenerationCancelled, RequestTimeout, ScreeningUnavailable
from sd_endpoint.jobs import CancelToken, GenerationSpec, ImageTask
from sd_endpoint.safety.base import Verdict
from sd_endpoint.service import SAFETY_HEADER, GenerationService
from tests.conftest import small_request


def pixels(record: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(record["generated_image"]))).convert("RGB"), np.int16)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


# --- fidelity: the same pixels as StableDiffusionPipeline.__call__ -------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "dpm_solver_multistep", "euler_ancestral"])
def test_image_equals_plain_diffusers(service: GenerationService, backend: Any, scheduler: str) -> None:
    import diffusers
    from diffusers import StableDiffusionPipeline

    from sd_endpoint.backends.diffusers_backend import SCHEDULER_CLASSES

    p = backend.pipe
    sched_cls = getattr(diffusers, SCHEDULER_CLASSES[scheduler])  # type: ignore[index]
    reference = StableDiffusionPipeline(
        vae=p.vae,
        text_encoder=p.text_encoder,
        tokenizer=p.tokenizer,
        unet=p.unet,
        scheduler=sched_cls.from_config(p.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    ref = reference(
        "a lighthouse on a cliff at dawn",
        negative_prompt="blurry, low quality",
        num_inference_steps=4,
        guidance_scale=7.5,
        height=64,
        width=96,
        generator=torch.Generator("cpu").manual_seed(1234),
    ).images[0]

    body = small_request(
        ["a lighthouse on a cliff at dawn"],
        negative_prompt="blurry, low quality",
        num_inference_steps=4,
        width=96,
        seed=1234,
        scheduler=scheduler,
    )
    (record,) = service.handle(body).records
    assert record["seed"] == 1234
    ours = pixels(record)
    assert ours.shape == (64, 96, 3)
    assert max_diff(ours, np.asarray(ref.convert("RGB"), np.int16)) <= 1


def test_default_output_is_768(service: GenerationService) -> None:
    body = {
        "input_data": {"columns": ["prompt"], "data": ["a"], "index": [0]},
        "parameters": {"num_inference_steps": 1},
    }
    (record,) = service.handle(body).records
    assert pixels(record).shape == (768, 768, 3)


# --- determinism: an image depends on its prompt, parameters and seed only ---------------------


def test_same_image_alone_or_with_others(service: GenerationService) -> None:
    alone = service.handle(small_request(["a red fox"], seed=42)).records[0]
    mixed = service.handle(
        {
            "input_data": {
                "columns": ["prompt", "negative_prompt", "seed"],
                "data": [["a blue whale", "ugly", 7], ["a red fox", None, 42], ["a tree", None, 9]],
            },
            "parameters": {"num_inference_steps": 3, "height": 64, "width": 64},
        }
    ).records
    assert [r["prompt"] for r in mixed] == ["a blue whale", "a red fox", "a tree"]
    assert [r["index"] for r in mixed] == [0, 1, 2]
    assert max_diff(pixels(alone), pixels(mixed[1])) <= 1
    assert max_diff(pixels(mixed[0]), pixels(mixed[1])) > 1  # different prompts really differ


def test_num_images_per_prompt_records_and_seeds(service: GenerationService) -> None:
    records = service.handle(small_request(["a", "b"], num_images_per_prompt=2, seed=10)).records
    assert [(r["prompt"], r["seed"], r["index"]) for r in records] == [
        ("a", 10, 0),
        ("a", 11, 0),
        ("b", 10, 1),
        ("b", 11, 1),
    ]
    # Image k of a row is exactly what a request with seed+k gives on its own.
    solo = service.handle(small_request(["a"], seed=11)).records[0]
    assert max_diff(pixels(records[1]), pixels(solo)) <= 1
    assert all(r["nsfw_content_detected"] is None for r in records)
    assert all("\n" not in r["generated_image"] for r in records)


@pytest.mark.parametrize(("fmt", "magic"), [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_output_formats(service: GenerationService, fmt: str, magic: bytes) -> None:
    (record,) = service.handle(small_request(output_format=fmt)).records
    assert base64.b64decode(record["generated_image"]).startswith(magic)


def test_long_prompt_is_truncated_and_the_record_says_so(service: GenerationService) -> None:
    long_prompt = " ".join(["castle"] * 120)
    records = service.handle(small_request([long_prompt, "short"])).records
    assert "77-token" in records[0]["warnings"][0]
    assert "warnings" not in records[1]


def test_concurrent_callers_do_not_share_scheduler_state(service: GenerationService) -> None:
    bodies = [
        small_request([f"prompt {i}"], seed=i, scheduler=s) for i, s in enumerate(["dpm_solver_multistep", "ddim"] * 3)
    ]
    solo = [pixels(service.handle(b).records[0]) for b in bodies]
    results: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        results[i] = pixels(service.handle(bodies[i]).records[0])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(max_diff(results[i], solo[i]) <= 1 for i in range(len(bodies)))


# --- stopping between denoising steps ----------------------------------------------------------


def test_cancel_stops_at_the_next_step(backend: Any) -> None:
    token = CancelToken()
    seen: list[int] = []

    def on_step(step: int, total: int) -> None:
        seen.append(step)
        if step == 3:
            token.cancel("client disconnected")

    spec = GenerationSpec(64, 64, 20, 7.5, "ddim")
    with pytest.raises(GenerationCancelled, match="client disconnected"):
        backend.generate(spec, [ImageTask("a", None, 1)], token, on_step)
    assert seen == [1, 2, 3]  # step 4 never ran
    assert token.steps_done == 3


def test_deadline_gives_408_and_stops(service: GenerationService) -> None:
    token = CancelToken(deadline=0.0)  # already passed
    with pytest.raises(RequestTimeout) as info:
        service.handle(small_request(num_inference_steps=50), token)
    assert info.value.status_code == 408


# --- the screening hook (a scripted screener; the real AACS stage is tested in tests/safety) ---


class ScriptedScreener:
    enabled = True

    def __init__(
        self, blocked_prompts: set[str] = frozenset(), block_images: set[int] = frozenset(), fail: bool = False
    ):  # type: ignore[assignment]
        self.blocked_prompts = blocked_prompts
        self.block_images = block_images
        self.fail = fail
        self.images_seen = 0

    def screen_prompts(self, prompts: Sequence[tuple[str, str | None]]) -> list[Verdict]:
        if self.fail:
            raise ScreeningUnavailable("Content screening is unavailable: connection refused.")
        return [
            Verdict(
                "prompt",
                p in self.blocked_prompts,
                {"Violence": 4 if p in self.blocked_prompts else 0},
                {"Violence": 4} if p in self.blocked_prompts else {},
            )
            for p, _ in prompts
        ]

    def screen_images(self, images: Sequence[bytes]) -> list[Verdict]:
        out = []
        for _ in images:
            blocked = self.images_seen in self.block_images
            self.images_seen += 1
            out.append(Verdict("image", blocked, {"Sexual": 6 if blocked else 0}, {"Sexual": 6} if blocked else {}))
        return out

    def close(self) -> None:
        pass


def test_blocked_rows_are_per_row(settings: Any, backend: Any) -> None:
    screener = ScriptedScreener(blocked_prompts={"bad prompt"}, block_images={1})
    svc = GenerationService(settings, backend, screener)
    calls: list[int] = []

    def counting_generate(spec: Any, tasks: Any, cancel: Any) -> Any:
        calls.append(len(tasks))
        return backend.generate(spec, tasks, cancel)

    request = svc.parse(small_request(["ok one", "bad prompt", "ok two"]))
    result = svc.score(request, generate=counting_generate)
    assert calls == [2]  # the blocked prompt was never generated
    ok, bad, blocked_image = result.records
    assert ok["nsfw_content_detected"] is False and ok["generated_image"]
    assert bad == {
        "prompt": "bad prompt",
        "generated_image": "",
        "nsfw_content_detected": True,
        "seed": 1,
        "index": 1,
        "blocked": {"stage": "prompt", "categories": {"Violence": 4}},
    }
    assert blocked_image["generated_image"] == "" and blocked_image["nsfw_content_detected"] is True
    assert blocked_image["blocked"]["stage"] == "image"
    assert result.headers[SAFETY_HEADER] == "screened"
    assert result.blocked == 2


def test_screening_failure_fails_closed_by_default(settings: Any, backend: Any) -> None:
    svc = GenerationService(settings, backend, ScriptedScreener(fail=True))
    with pytest.raises(ScreeningUnavailable) as info:
        svc.handle(small_request())
    assert info.value.status_code == 503


def test_screening_failure_can_fail_open(settings: Any, backend: Any) -> None:
    svc = GenerationService(settings, backend, ScriptedScreener(fail=True), fail_open=True)
    result = svc.handle(small_request(["a", "b"]))
    assert result.headers[SAFETY_HEADER] == "skipped"
    assert all(r["nsfw_content_detected"] is None and r["generated_image"] for r in result.records)


def test_a_json_string_body_is_not_decoded_twice(service: GenerationService) -> None:
    import json

    from sd_endpoint.errors import InvalidRequest

    double_encoded = json.dumps(json.dumps(small_request()))
    with pytest.raises(InvalidRequest, match="must be a JSON object.*got a JSON string"):
        service.handle(double_encoded)
