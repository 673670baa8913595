"""The official ``openai`` package, unchanged, against ``sd-endpoint serve`` (uvicorn on loopback, tiny model).

``base_url`` points at the server's ``/v1``; the key is the endpoint's own, sent as ``Authorization: Bearer``.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.support.servers import LiveServer, model_env

pytestmark = pytest.mark.slow

KEY = "openai-live-key-161803"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = model_env(tiny_model_dir, cache_dir, keys=KEY, default_height=64, default_width=64, default_steps=2)
    live = LiveServer(env, tmp_path_factory.mktemp("openai-live") / "server.log", key=KEY)
    live.env["SD_ENDPOINT_OPENAI_IMAGE_BASE_URL"] = live.url  # response_format "url" served by this server
    with live.serving():
        yield live


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    # No retries: a 429/5xx must surface here, not be retried into a pass.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)


def pixels(b64: str | None) -> np.ndarray:
    assert b64
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    image.load()
    return np.asarray(image.convert("RGB"))


def test_generate_returns_decodable_images_with_their_seeds(client: openai.OpenAI, server: LiveServer) -> None:
    extras = {"steps": 2, "guidance_scale": 6.0, "negative_prompt": "blurry"}
    resp = client.images.generate(
        prompt="a lighthouse at dawn",
        n=2,
        size="64x64",  # type: ignore[arg-type]  # the SDK's Literal lists OpenAI's sizes; the wire takes any
        response_format="b64_json",
        extra_body={"seed": 7, **extras},
    )
    assert resp.data is not None and len(resp.data) == 2
    first, second = (pixels(item.b64_json) for item in resp.data)
    assert first.shape == second.shape == (64, 64, 3)
    assert first.std() > 1 and not np.array_equal(first, second)  # a real picture, two different seeds
    assert [item.model_extra["seed"] for item in resp.data] == [7, 8]  # type: ignore[index]

    again = client.images.generate(prompt="a lighthouse at dawn", extra_body={"seed": 8, **extras})
    assert again.data is not None and again.size == "64x64"  # "auto": the server's default size
    # The same seed gives the same image, alone or second in a batch (the seed fixes the noise; 1/255 of slack
    # for batched CPU arithmetic).
    assert np.abs(pixels(again.data[0].b64_json).astype(int) - second).max() <= 1

    jpeg = client.images.generate(prompt="a cat", output_format="jpeg", extra_body={"steps": 2})
    assert jpeg.data is not None and pixels(jpeg.data[0].b64_json).shape == (64, 64, 3)
    metrics = server.metrics()
    assert metrics['sd_requests_total{route="/v1/images/generations",status="200"}'] >= 3


def test_url_responses_download_without_the_key(client: openai.OpenAI, server: LiveServer) -> None:
    resp = client.images.generate(prompt="a harbour", response_format="url", extra_body={"seed": 11, "steps": 2})
    assert resp.data is not None and resp.data[0].b64_json is None and resp.data[0].url
    assert resp.data[0].url.startswith(f"{server.url}/v1/images/files/")
    download = httpx.get(resp.data[0].url, timeout=60)  # no Authorization: the URL is the permission
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    same = client.images.generate(prompt="a harbour", extra_body={"seed": 11, "steps": 2})
    assert same.data is not None
    assert download.content == base64.b64decode(same.data[0].b64_json or "")


def test_errors_surface_as_the_sdks_exceptions_with_our_message(client: openai.OpenAI, server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="a cat", size="100x64")  # type: ignore[arg-type]
    assert bad.value.status_code == 400 and bad.value.param == "size"
    assert "size (width): must be a multiple of 8" in bad.value.message

    with pytest.raises(openai.BadRequestError) as steps:
        client.images.generate(prompt="a cat", extra_body={"steps": 10_000})
    assert steps.value.param == "steps" and "steps: must be between 1 and 150" in steps.value.message

    wrong_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        wrong_key.images.generate(prompt="a cat")
    assert denied.value.code == "invalid_api_key" and "Invalid key" in denied.value.message


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_edit_does_image_to_image_and_inpainting(client: openai.OpenAI, server: LiveServer) -> None:
    source = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    alpha_mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    alpha_mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # OpenAI's mask: transparent = repaint (the left half)
    image_file = ("in.png", png_bytes(source), "image/png")
    extras = {"seed": 5, "steps": 4}

    i2i = client.images.edit(image=image_file, prompt="a red barn", n=2, extra_body={**extras, "strength": 0.75})
    assert i2i.data is not None and len(i2i.data) == 2 and i2i.size == "64x64"  # the input's size
    assert all(pixels(item.b64_json).shape == (64, 64, 3) for item in i2i.data)

    inpaint = client.images.edit(
        image=image_file,
        mask=("mask.png", png_bytes(alpha_mask), "image/png"),
        prompt="a red barn",
        size="64x64",  # type: ignore[arg-type]
        extra_body=extras,
    )
    assert inpaint.data is not None and inpaint.data[0].b64_json
    assert not np.array_equal(pixels(inpaint.data[0].b64_json), pixels(i2i.data[0].b64_json))

    # The same request in the contract's own form (white = repaint) through /score: the very same image.
    white_mask = Image.new("L", (64, 64), 0)
    white_mask.paste(255, (0, 0, 32, 64))
    row = {
        "prompt": "a red barn",
        "image": base64.b64encode(png_bytes(source)).decode(),
        "mask_image": base64.b64encode(png_bytes(white_mask)).decode(),
    }
    body = {
        "input_data": {"columns": list(row), "data": [row], "index": [0]},
        "parameters": {"num_inference_steps": 4, "seed": 5, "width": 64, "height": 64},
    }
    score = httpx.post(f"{server.url}/score", json=body, headers=server.headers(), timeout=300)
    assert score.status_code == 200, score.text
    assert score.json()[0]["generated_image"] == inpaint.data[0].b64_json

    with pytest.raises(openai.BadRequestError) as bad:
        client.images.edit(
            image=image_file,
            mask=("m.png", png_bytes(white_mask.resize((32, 32))), "image/png"),
            prompt="a red barn",
            extra_body=extras,
        )
    assert bad.value.param == "mask" and "mask: is 32x32 but the image is 64x64" in bad.value.message


def test_the_readme_snippet_runs_as_written(
    server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    found = re.search(r"```python\n(import base64\n.*?from openai import OpenAI\n.*?)```", readme, re.S)
    assert found, "README: the OpenAI snippet is missing"
    code = found.group(1)
    # Only the address, the key and the cost change: tiny size and 2 steps on this machine.
    for old, new in (
        ("http://127.0.0.1:5001/v1", f"{server.url}/v1"),
        ('"<key, or anything when no keys are set>"', repr(KEY)),
        ('size="768x768"', 'size="64x64"'),
        ('"steps": 30', '"steps": 2'),
    ):
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    written = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in written] == ["lighthouse-42.png", "lighthouse-43.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.size == (64, 64)
