"""/score with image-to-image and inpainting requests, in-process over FakeBackend (the model path is tested
in tests/backends/test_image_tasks.py)."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image

from sd_endpoint.server import create_app
from sd_endpoint.service import GenerationService
from tests.server.conftest import fake_settings, wait_ready
from tests.support.fakes import FakeBackend


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_image_requests_are_parsed_off_the_event_loop_and_reach_the_backend() -> None:
    backend = FakeBackend()
    settings = fake_settings()
    service = GenerationService(settings, backend)
    parsed_in_loop: list[bool] = []
    parse = service.parse

    def spy(body: Any) -> Any:
        parsed_in_loop.append(in_event_loop())
        return parse(body)

    service.parse = spy  # type: ignore[method-assign]
    picture, mask = Image.new("RGB", (80, 72), "teal"), Image.new("L", (80, 72), 0)
    with TestClient(create_app(settings, service, on_fatal=lambda: None)) as client:
        wait_ready(client.get)
        ok = client.post(
            "/score",
            json={
                "input_data": {"columns": ["prompt", "image", "mask_image"], "data": [["a", b64(picture), b64(mask)]]},
                "parameters": {"strength": 0.5, "seed": 4},
            },
        )
        bad = client.post(
            "/score",
            json={"input_data": {"columns": ["prompt", "image"], "data": [["a", b64(picture)], ["b", "%%%"]]}},
        )
    assert ok.status_code == 200 and ok.json()[0]["seed"] == 4
    [(spec, tasks)] = [call for call in backend.calls if call[1][0].prompt == "a"]  # not the warm-up
    assert (spec.task, spec.strength, spec.width, spec.height) == ("inpainting", 0.5, 80, 72)
    assert tasks[0].image is not None and tasks[0].mask is not None
    assert bad.status_code == 400
    assert bad.json()["message"].startswith("input_data.data[1].image: is not valid base64")
    assert parsed_in_loop == [False, False]
