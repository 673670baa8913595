"""The service with input images: content screening of the input (per row, before generation) and the
body cap."""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Sequence
from typing import Any

import pytest
from PIL import Image

from sd_endpoint.errors import PayloadTooLarge, ScreeningUnavailable
from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask
from sd_endpoint.safety.base import Verdict
from sd_endpoint.service import SAFETY_HEADER, GenerationService


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


RED = Image.new("RGB", (80, 72), (250, 10, 10))  # the scripted screener's "unsafe" picture
BLUE = Image.new("RGB", (80, 72), (10, 10, 250))


class RedScreener:
    """Blocks images that are mostly red; records what it was shown."""

    enabled = True

    def __init__(self, fail_images: bool = False) -> None:
        self.fail_images = fail_images
        self.image_calls: list[list[tuple[int, int]]] = []

    def screen_prompts(self, prompts: Sequence[tuple[str, str | None]]) -> list[Verdict]:
        return [Verdict("prompt", p == "bad prompt") for p, _ in prompts]

    def screen_images(self, images: Sequence[bytes]) -> list[Verdict]:
        if self.fail_images:
            raise ScreeningUnavailable("Content screening is unavailable: connection refused.")
        opened = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
        self.image_calls.append([im.size for im in opened])
        out = []
        for im in opened:
            r, g, b = (sum(c.getdata()) / (im.width * im.height) for c in im.split())
            red = r > 200 and g < 50 and b < 50
            out.append(Verdict("image", red, {"Violence": 6 if red else 0}, {"Violence": 6} if red else {}))
        return out

    def close(self) -> None:
        pass


def request(rows: list[list[str]], **params: Any) -> dict[str, Any]:
    return {
        "input_data": {"columns": ["prompt", "image"], "data": rows},
        "parameters": {"num_inference_steps": 2, "seed": 3, "strength": 1.0, **params},
    }


def test_a_blocked_input_image_blocks_its_row_before_generation(settings: Any, backend: Any) -> None:
    screener = RedScreener()
    svc = GenerationService(settings, backend, screener)
    generated: list[list[ImageTask]] = []

    def spy(spec: GenerationSpec, tasks: Sequence[ImageTask], cancel: CancelToken | None) -> BatchResult:
        generated.append(list(tasks))
        result: BatchResult = backend.generate(spec, tasks, cancel)
        return result

    body = request([["a boat", b64(BLUE)], ["a boat", b64(RED)], ["bad prompt", b64(RED)]], width=96)
    result = svc.score(svc.parse(body), generate=spy)
    ok, blocked, bad_prompt = result.records
    assert [t.image.getpixel((0, 0)) for t in generated[0]] == [(10, 10, 250)]  # type: ignore[union-attr]
    assert ok["generated_image"] and ok["nsfw_content_detected"] is False
    assert blocked["generated_image"] == "" and blocked["nsfw_content_detected"] is True
    assert blocked["blocked"] == {"stage": "input_image", "categories": {"Violence": 6}}
    assert bad_prompt["blocked"]["stage"] == "prompt"
    # Inputs screened as the model sees them (resized to 96 wide); the blocked prompt's input was not sent.
    assert screener.image_calls[0] == [(96, 80), (96, 80)]
    assert result.blocked == 2 and result.headers[SAFETY_HEADER] == "screened"


def test_input_screening_failure_fails_closed_or_open(settings: Any, backend: Any) -> None:
    body = request([["a boat", b64(BLUE)]], width=64)
    closed = GenerationService(settings, backend, RedScreener(fail_images=True))
    with pytest.raises(ScreeningUnavailable) as info:
        closed.handle(body)
    assert info.value.status_code == 503
    opened = GenerationService(settings, backend, RedScreener(fail_images=True), fail_open=True)
    result = opened.handle(body)
    assert result.headers[SAFETY_HEADER] == "skipped" and result.records[0]["generated_image"]
    assert result.records[0]["nsfw_content_detected"] is None


def test_body_with_an_image_over_the_body_cap_is_413(settings: Any, backend: Any) -> None:
    svc = GenerationService(settings.model_copy(update={"max_body_bytes": 4096}), backend)
    big = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))  # ~12 kB as PNG
    with pytest.raises(PayloadTooLarge) as info:
        svc.handle(json.dumps(request([["a", b64(big)]])))
    assert info.value.status_code == 413
