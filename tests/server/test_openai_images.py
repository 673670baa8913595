"""The OpenAI images API in-process, over FakeBackend: translation both ways, errors in OpenAI's shape, and
proof that it shares /score's path (micro-batching, admission, auth, screening, metrics).

The official ``openai`` client against a real uvicorn process with the tiny model: test_openai_live.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sd_endpoint import metrics
from sd_endpoint.safety.base import Verdict
from sd_endpoint.server import create_app
from sd_endpoint.service import GenerationService
from tests.conftest import small_request
from tests.server.conftest import KEYS, fake_app, fake_settings, running, wait_ready
from tests.support.fakes import FakeBackend, colour_of

URL = "/v1/images/generations"


def gen(prompt: str = "a red fox", **fields: Any) -> dict[str, Any]:
    return {"prompt": prompt, "size": "64x64", "steps": 2, **fields}


def decode(item: dict[str, Any]) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"], validate=True)))
    image.load()
    return image


def error_of(resp: Any) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    return error


def sample(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ------------------------------------------------------------------------------------------------
# Translation


def test_generations_return_each_image_with_its_seed(client: TestClient) -> None:
    resp = client.post(URL, json=gen("a red fox", n=3, seed=40, size="96x64"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert isinstance(body["created"], int) and body["size"] == "96x64" and body["output_format"] == "png"
    assert [item["seed"] for item in body["data"]] == [40, 41, 42]
    for item in body["data"]:
        image = decode(item)
        assert image.format == "PNG" and image.size == (96, 64)  # OpenAI's size is WIDTHxHEIGHT
        assert image.getpixel((0, 0)) == colour_of("a red fox", item["seed"])


def test_our_extras_reach_the_backend_under_their_documented_names(client: TestClient) -> None:
    backend = client.app.state.sd.service.backend  # type: ignore[attr-defined]
    resp = client.post(
        URL,
        json=gen(
            "a lighthouse",
            steps=4,
            guidance_scale=3.5,
            scheduler="euler",
            negative_prompt="blurry",
            seed=9,
            output_format="jpeg",
            model="dall-e-2",
            quality="standard",
            user="someone",
        ),
    )
    assert resp.status_code == 200, resp.text
    spec, tasks = backend.calls[-1]
    assert (spec.steps, spec.guidance_scale, spec.scheduler, spec.height, spec.width) == (4, 3.5, "euler", 64, 64)
    assert [(t.prompt, t.negative_prompt, t.seed) for t in tasks] == [("a lighthouse", "blurry", 9)]
    assert decode(resp.json()["data"][0]).format == "JPEG" and resp.json()["output_format"] == "jpeg"


def test_auto_size_is_the_servers_default_and_is_reported(client: TestClient) -> None:
    resp = client.post(URL, json={"prompt": "a cat", "size": "auto", "steps": 2, "response_format": "b64_json"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["size"] == "64x64" and decode(resp.json()["data"][0]).size == (64, 64)


# ------------------------------------------------------------------------------------------------
# Errors: OpenAI's shape, our statuses and messages, the OpenAI field name in both message and param

BAD: list[tuple[str, dict[str, Any], str, str | None]] = [
    # (case, body, text the message must contain, param)
    ("url response", gen(response_format="url"), 'response_format "url" is not supported', "response_format"),
    ("size not WxH", gen(size="big"), '"WIDTHxHEIGHT"', "size"),
    ("size not a multiple of 8", gen(size="100x64"), "size (width): must be a multiple of 8", "size"),
    ("size too small", gen(size="64x32"), "size (height)", "size"),
    ("too many pixels", gen(size="2048x2048"), "SD_ENDPOINT_MAX_PIXELS", "size"),
    ("steps out of range", gen(steps=1000), "steps: must be between 1 and 150", "steps"),
    ("steps zero", gen(steps=0), "steps", "steps"),
    ("n too large", gen(n=9), "SD_ENDPOINT_MAX_IMAGES_PER_REQUEST", "n"),
    ("n zero", gen(n=0), "n: ", "n"),
    ("guidance out of range", gen(guidance_scale=51.0), "guidance_scale", "guidance_scale"),
    ("negative seed", gen(seed=-1), "seed", "seed"),
    ("blank prompt", gen(prompt="  "), "prompt: must not be empty", "prompt"),
    ("unknown scheduler", gen(scheduler="k_fancy"), "scheduler", "scheduler"),
    ("unknown field", gen(num_inference_steps=3), "Unknown field 'num_inference_steps'", "num_inference_steps"),
    ("missing prompt", {"n": 1}, "prompt: is required", "prompt"),
    ("n of the wrong type", gen(n="2"), "n: ", "n"),
    ("negative prompt without guidance", gen(negative_prompt="x", guidance_scale=1.0), "no effect", None),
]


@pytest.mark.parametrize(("case", "body", "expected", "param"), BAD, ids=[c[0] for c in BAD])
def test_each_bad_field_is_a_400_naming_the_openai_field(
    client: TestClient, case: str, body: dict[str, Any], expected: str, param: str | None
) -> None:
    resp = client.post(URL, json=body)
    assert resp.status_code == 400, (case, resp.text)
    error = error_of(resp)
    assert expected in error["message"], error
    assert "parameters." not in error["message"] and "input_data" not in error["message"], error
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


def test_bodies_that_are_not_a_json_object(client: TestClient) -> None:
    for raw, expected in ((b"{", "not valid JSON"), (b"[1]", "JSON object"), (b"", "empty")):
        resp = client.post(URL, content=raw, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400 and expected in error_of(resp)["message"]
    resp = client.post(URL, content=b"prompt=a", headers={"Content-Type": "text/plain"})
    assert resp.status_code == 415 and "application/json" in error_of(resp)["message"]


@pytest.mark.parametrize(("field", "param"), [("prompt", "prompt"), ("negative_prompt", "negative_prompt")])
def test_a_lone_surrogate_is_a_400_naming_the_field(client: TestClient, field: str, param: str) -> None:
    raw = f'{{"prompt": "a cat", "size": "64x64", "{field}": "bad \\ud800 text"}}'
    resp = client.post(URL, content=raw.encode(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    error = error_of(resp)
    assert error["param"] == param and "surrogate" in error["message"]


def test_size_limit_is_a_413_in_openai_shape() -> None:
    app, _ = fake_app(max_body_bytes=2048)
    with TestClient(app) as c:
        wait_ready(c.get)
        resp = c.post(URL, json=gen("x" * 4000))
        assert resp.status_code == 413
        assert error_of(resp)["code"] == "request_too_large"
        assert "SD_ENDPOINT_MAX_BODY_BYTES" in error_of(resp)["message"]


def test_unknown_v1_paths_and_wrong_methods(client: TestClient) -> None:
    missing = client.get("/v1/models")
    assert missing.status_code == 404 and URL in error_of(missing)["message"]
    wrong = client.get(URL)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert error_of(wrong)["type"] == "invalid_request_error"
    # the contract's routes keep azmlinfsrv's bodies
    assert client.get("/nope").json().keys() == {"message"}


def test_keys_are_checked_with_the_same_bearer_header(keyed_client: TestClient) -> None:
    for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEYS[0]}"}):
        resp = keyed_client.post(URL, json=gen(), headers=header)
        assert resp.status_code == 401 and "www-authenticate" in resp.headers
        assert (error_of(resp)["type"], error_of(resp)["code"]) == ("authentication_error", "invalid_api_key")
    for key in KEYS:
        ok = keyed_client.post(URL, json=gen(), headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200, ok.text


def test_not_ready_is_a_503_in_openai_shape() -> None:
    backend = FakeBackend()
    backend.gate.clear()  # the warm-up generation never finishes
    settings = fake_settings()
    app = create_app(settings, GenerationService(settings, backend), on_fatal=lambda: None)
    try:
        with TestClient(app) as c:
            resp = c.post(URL, json=gen())
            assert resp.status_code == 503 and error_of(resp)["type"] == "server_error"
            assert "warming up" in error_of(resp)["message"]
            backend.gate.set()
    finally:
        backend.gate.set()


# ------------------------------------------------------------------------------------------------
# The same path as /score


def test_an_openai_request_is_micro_batched_with_a_score_request() -> None:
    app, backend = fake_app(max_concurrent_requests=3, max_batch_size=4)

    async def scenario() -> tuple[Any, Any, Any]:
        async with running(app) as c:
            backend.gate.clear()
            backend.entered.clear()
            first = asyncio.create_task(c.post("/score", json=small_request(["first"], num_inference_steps=2)))
            while not backend.entered.is_set():
                await asyncio.sleep(0.005)
            score = asyncio.create_task(c.post("/score", json=small_request(["azure"], num_inference_steps=2)))
            openai = asyncio.create_task(c.post(URL, json=gen("openai", n=2, seed=5)))
            while app.state.sd.batcher.queued < 2:
                await asyncio.sleep(0.005)
            backend.gate.set()
            return await first, await score, await openai

    first, score, openai = asyncio.run(scenario())
    assert first.status_code == score.status_code == openai.status_code == 200
    # warm-up, first, then the /score row and both OpenAI images in ONE pipeline call
    merged = backend.calls[2][1]
    assert sorted((t.prompt, t.seed) for t in merged) == [("azure", 1), ("openai", 5), ("openai", 6)]
    assert [decode(i).getpixel((0, 0)) for i in openai.json()["data"]] == [
        colour_of("openai", 5),
        colour_of("openai", 6),
    ]


def test_admission_refuses_with_429_in_openai_shape() -> None:
    app, backend = fake_app(max_concurrent_requests=1, max_queued_requests=0, max_queue_wait_ms=60_000)

    async def scenario() -> Any:
        async with running(app) as c:
            backend.gate.clear()
            backend.entered.clear()
            first = asyncio.create_task(c.post("/score", json=small_request(["first"])))
            while not backend.entered.is_set():
                await asyncio.sleep(0.005)
            refused = await c.post(URL, json=gen())
            backend.gate.set()
            assert (await first).status_code == 200
            return refused

    refused = asyncio.run(scenario())
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    error = error_of(refused)
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "SD_ENDPOINT_MAX_CONCURRENT_REQUESTS" in error["message"]


def test_metrics_count_the_route(client: TestClient) -> None:
    before_ok = sample("sd_requests_total", route=URL, status="200")
    before_bad = sample("sd_requests_total", route=URL, status="400")
    before_images = sample("sd_images_generated_total")
    assert client.post(URL, json=gen(n=2)).status_code == 200
    assert client.post(URL, json=gen(size="1x1")).status_code == 400
    assert sample("sd_requests_total", route=URL, status="200") == before_ok + 1
    assert sample("sd_requests_total", route=URL, status="400") == before_bad + 1
    assert sample("sd_images_generated_total") == before_images + 2


class _Screener:
    """Blocks prompts containing 'forbidden' (prompt stage) and the second image it sees (image stage)."""

    enabled = True

    def __init__(self) -> None:
        self.images_seen = 0

    def screen_prompts(self, prompts: Sequence[tuple[str, str | None]]) -> list[Verdict]:
        return [
            Verdict("prompt", True, {"Violence": 4}, {"Violence": 4})
            if "forbidden" in p
            else Verdict("prompt", False, {"Violence": 0})
            for p, _ in prompts
        ]

    def screen_images(self, images: Sequence[bytes]) -> list[Verdict]:
        out = []
        for _ in images:
            self.images_seen += 1
            blocked = self.images_seen == 2
            out.append(Verdict("image", blocked, {"Sexual": 6 if blocked else 0}, {"Sexual": 6} if blocked else {}))
        return out

    def close(self) -> None:
        pass


@pytest.fixture
def screened() -> Iterator[TestClient]:
    backend = FakeBackend()
    settings = fake_settings()
    app = create_app(settings, GenerationService(settings, backend, _Screener()), on_fatal=lambda: None)
    with TestClient(app) as c:
        wait_ready(c.get)
        yield c


def test_screening_blocks_like_openai_content_policy(screened: TestClient) -> None:
    blocked = screened.post(URL, json=gen("a forbidden thing", n=2))
    assert blocked.status_code == 400
    error = error_of(blocked)
    assert error["code"] == "content_policy_violation"
    assert "prompt stage: Violence (severity 4)" in error["message"]

    partly = screened.post(URL, json=gen("a fine thing", n=3, seed=10))
    assert partly.status_code == 200 and partly.headers["x-content-safety"] == "screened"
    body = partly.json()
    assert [item["seed"] for item in body["data"]] == [10, 12]
    assert [(b["seed"], b["reason"]) for b in body["blocked"]] == [(11, "image stage: Sexual (severity 6)")]


# ------------------------------------------------------------------------------------------------
# Edits: image-to-image and inpainting, multipart

EDITS = "/v1/images/edits"


def png(size: tuple[int, int], colour: Any = (200, 30, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def openai_mask(size: tuple[int, int]) -> bytes:
    """OpenAI's convention: the left half transparent (repaint), the right half opaque (keep)."""
    image = Image.new("RGBA", size, (10, 20, 30, 255))
    image.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def edit(client: TestClient, files: dict[str, Any], **fields: Any) -> Any:
    data = {"prompt": "a red barn", "steps": "4", **{k: str(v) for k, v in fields.items()}}
    return client.post(EDITS, data=data, files=files)


def test_image_to_image_takes_the_inputs_size_and_strength(client: TestClient) -> None:
    backend = client.app.state.sd.service.backend  # type: ignore[attr-defined]
    resp = edit(client, {"image": ("in.png", png((96, 64)), "image/png")}, strength=0.5, seed=3, n=2)
    assert resp.status_code == 200, resp.text
    spec, tasks = backend.calls[-1]
    assert (spec.task, spec.strength, spec.width, spec.height) == ("image-to-image", 0.5, 96, 64)
    assert [t.seed for t in tasks] == [3, 4] and all(t.mask is None for t in tasks)
    assert tasks[0].image.getpixel((5, 5)) == (200, 30, 30)
    body = resp.json()
    assert body["size"] == "96x64" and [decode(i).size for i in body["data"]] == [(96, 64), (96, 64)]


def test_an_openai_mask_becomes_white_where_it_is_transparent(client: TestClient) -> None:
    backend = client.app.state.sd.service.backend  # type: ignore[attr-defined]
    files = {"image": ("in.png", png((64, 64)), "image/png"), "mask": ("mask.png", openai_mask((64, 64)), "image/png")}
    resp = edit(client, files, size="64x64")
    assert resp.status_code == 200, resp.text
    spec, (task,) = backend.calls[-1]
    assert spec.task == "inpainting" and task.mask is not None
    assert (task.mask.getpixel((5, 5)), task.mask.getpixel((60, 5))) == (255, 0)  # repaint left, keep right


def test_a_mask_without_transparency_is_read_as_the_contracts_white_means_repaint(client: TestClient) -> None:
    backend = client.app.state.sd.service.backend  # type: ignore[attr-defined]
    grey = Image.new("L", (64, 64), 0)
    grey.paste(255, (0, 0, 64, 16))  # the top quarter white: repaint
    buf = io.BytesIO()
    grey.save(buf, "PNG")
    files = {"image": ("in.png", png((64, 64)), "image/png"), "mask": ("mask.png", buf.getvalue(), "image/png")}
    assert edit(client, files).status_code == 200
    _, (task,) = backend.calls[-1]
    assert (task.mask.getpixel((5, 5)), task.mask.getpixel((5, 40))) == (255, 0)


def test_edits_take_the_same_bearer_key(keyed_client: TestClient) -> None:
    files = {"image": ("in.png", png((64, 64)), "image/png")}
    denied = edit(keyed_client, files)
    assert denied.status_code == 401 and error_of(denied)["code"] == "invalid_api_key"
    ok = keyed_client.post(
        EDITS, data={"prompt": "x", "steps": "2"}, files=files, headers={"Authorization": f"Bearer {KEYS[1]}"}
    )
    assert ok.status_code == 200, ok.text


BAD_EDITS: list[tuple[str, dict[str, Any], dict[str, Any], str, str | None]] = [
    # (case, files, fields, text the message must contain, param)
    ("no image", {}, {}, "image: is required", "image"),
    ("not an image", {"image": ("a.png", b"not a picture", "image/png")}, {}, "image: is not a PNG", "image"),
    (
        "mask of another size",
        {"image": ("a.png", png((64, 64)), "image/png"), "mask": ("m.png", png((32, 32), 255, "L"), "image/png")},
        {},
        "mask: is 32x32 but the image is 64x64",
        "mask",
    ),
    (
        "colour mask",
        {"image": ("a.png", png((64, 64)), "image/png"), "mask": ("m.png", png((64, 64), (1, 2, 3)), "image/png")},
        {},
        "mask: is a colour image",
        "mask",
    ),
    (
        "mask that is not an image",
        {"image": ("a.png", png((64, 64)), "image/png"), "mask": ("m.png", b"GIF89a....", "image/png")},
        {},
        "mask: is not a PNG, JPEG or WebP image",
        "mask",
    ),
    (
        "strength out of range",
        {"image": ("a.png", png((64, 64)), "image/png")},
        {"strength": 1.5},
        "strength",
        "strength",
    ),
    (
        "steps not a number",
        {"image": ("a.png", png((64, 64)), "image/png")},
        {"steps": "many"},
        "steps: must be an integer",
        "steps",
    ),
    (
        "unknown field",
        {"image": ("a.png", png((64, 64)), "image/png")},
        {"colour": "red"},
        "Unknown field 'colour'",
        "colour",
    ),
    (
        "strength leaves no step",
        {"image": ("a.png", png((64, 64)), "image/png")},
        {"strength": 0.1, "steps": 2},
        "strength: 0.1 x steps 2 leaves no denoising step",
        "strength",
    ),
]


@pytest.mark.parametrize(("case", "files", "fields", "expected", "param"), BAD_EDITS, ids=[c[0] for c in BAD_EDITS])
def test_each_bad_edit_is_a_400_naming_the_openai_field(
    client: TestClient, case: str, files: dict[str, Any], fields: dict[str, Any], expected: str, param: str | None
) -> None:
    data = {"prompt": "a red barn", "steps": "4", **{k: str(v) for k, v in fields.items()}}
    resp = client.post(EDITS, data=data, files=files or {"note": (None, "multipart without a file")})
    assert resp.status_code == 400, (case, resp.text)
    error = error_of(resp)
    assert expected in error["message"] and error["param"] == param, error
    assert "input_data" not in error["message"] and "mask_image" not in error["message"], error


def test_two_images_or_json_are_refused(client: TestClient) -> None:
    two = [("image[]", ("a.png", png((64, 64)), "image/png")), ("image[]", ("b.png", png((64, 64)), "image/png"))]
    resp = client.post(EDITS, data={"prompt": "x"}, files=two)
    assert resp.status_code == 400 and "one image per request" in error_of(resp)["message"]
    as_json = client.post(EDITS, json={"prompt": "x", "image": "aGk="})
    assert as_json.status_code == 415 and "multipart/form-data" in error_of(as_json)["message"]


def test_a_decompression_bomb_mask_is_refused_before_decoding() -> None:
    app, _ = fake_app(max_input_pixels=64 * 64)
    with TestClient(app) as c:
        wait_ready(c.get)
        big = png((200, 200), (0, 0, 0, 0), "RGBA")
        files = {"image": ("a.png", png((64, 64)), "image/png"), "mask": ("m.png", big, "image/png")}
        resp = edit(c, files)
        assert resp.status_code == 400
        error = error_of(resp)
        assert error["param"] == "mask" and "SD_ENDPOINT_MAX_INPUT_PIXELS" in error["message"]


def test_the_api_documents_describe_both_routes(client: TestClient) -> None:
    v31 = client.get("/openapi.json").json()["paths"]
    assert "application/json" in v31[URL]["post"]["requestBody"]["content"]
    form = v31[EDITS]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image", "prompt"] and form["properties"]["image"]["format"] == "binary"
    # Swagger 2 (azmlinfsrv's /swagger.json) has no multipart body: one formData parameter per part.
    v2 = client.get("/swagger.json").json()["paths"][EDITS]["post"]
    assert v2["consumes"] == ["multipart/form-data"]
    params = {p["name"]: p for p in v2["parameters"]}
    assert all(p["in"] == "formData" for p in params.values())
    assert (params["image"]["type"], params["image"]["required"]) == ("file", True)
    assert params["mask"]["type"] == "file" and params["mask"]["required"] is False
    assert params["n"]["type"] == "integer" and params["strength"]["type"] == "number"
    assert params["scheduler"]["enum"][0] == "ddim"
    assert "/playground" in v31 and "/v1/{rest}" not in v31


# ------------------------------------------------------------------------------------------------
# response_format "url": only with a base URL; images kept for a bounded time and memory


def test_url_answers_download_links_that_need_no_key() -> None:
    app, _ = fake_app(keys=",".join(KEYS), openai_image_base_url="https://images.example:5001/", openai_image_ttl_s=60)
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    with TestClient(app) as c:
        wait_ready(c.get)
        resp = c.post(URL, json=gen("a red fox", n=2, seed=4, response_format="url"), headers=auth)
        assert resp.status_code == 200, resp.text
        items = resp.json()["data"]
        assert [i["seed"] for i in items] == [4, 5] and all("b64_json" not in i for i in items)
        prefix = "https://images.example:5001/v1/images/files/"
        assert all(i["url"].startswith(prefix) and i["url"].endswith(".png") for i in items)
        for item in items:
            path = item["url"].removeprefix("https://images.example:5001")
            got = c.get(path)  # no key: the unguessable name is the permission
            assert got.status_code == 200 and got.headers["content-type"] == "image/png"
            image = Image.open(io.BytesIO(got.content))
            assert image.getpixel((0, 0)) == colour_of("a red fox", item["seed"])
        jpeg = c.post(URL, json=gen("a cat", response_format="url", output_format="jpeg"), headers=auth)
        (item,) = jpeg.json()["data"]
        path = item["url"].removeprefix("https://images.example:5001")
        assert path.endswith(".jpeg") and c.get(path).headers["content-type"] == "image/jpeg"
        assert c.get(path.replace(".jpeg", ".png")).status_code == 404
        missing = c.get("/v1/images/files/not-an-id.png")
        assert missing.status_code == 404 and "expired" in error_of(missing)["message"]


def test_a_base_url_that_is_not_one_is_a_config_error() -> None:
    from sd_endpoint.errors import ConfigError
    from sd_endpoint.settings import load_settings

    with pytest.raises(ConfigError, match="SD_ENDPOINT_OPENAI_IMAGE_BASE_URL"):
        load_settings(openai_image_base_url="images.example")
    assert load_settings(openai_image_base_url="http://h:1/").openai_image_base_url == "http://h:1"


def test_the_store_forgets_after_the_ttl_and_drops_the_oldest_when_full() -> None:
    from sd_endpoint.server.image_store import ImageStore

    now = [0.0]
    store = ImageStore(ttl_s=10, max_bytes=100, clock=lambda: now[0])
    first = store.put(b"a" * 40, "image/png")
    now[0] = 5
    second = store.put(b"b" * 40, "image/png")
    assert first and second and store.get(first) is not None and store.bytes == 80
    third = store.put(b"c" * 40, "image/png")  # 120 > 100: the oldest goes
    assert third and store.get(first) is None and store.get(second) is not None and store.bytes == 80
    now[0] = 15.5  # second expired at 15, third (put at 5) too
    assert store.get(second) is None and store.get(third) is None and len(store) == 0 and store.bytes == 0
    assert store.put(b"x" * 101, "image/png") is None  # larger than the whole store
