"""Image-to-image and inpainting in the contract: the task from the columns in every request form, the
output size rules, and every bad image input as a 400 naming its row and field."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sd_endpoint.contract import Limits
from sd_endpoint.errors import InvalidRequest
from sd_endpoint.request_parsing import parse_request
from sd_endpoint.request_resolution import image_output_size

LIMITS = Limits(max_images=8, max_pixels=1024 * 1024, max_steps=150, max_prompt_chars=2000)


def encode(image: Image.Image, fmt: str = "PNG", **save: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return base64.b64encode(buf.getvalue()).decode()


def noise(width: int = 100, height: int = 72, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def square_mask(width: int = 100, height: int = 72) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, width // 2, height // 2))
    return mask


IMAGE = encode(noise())
MASK = encode(square_mask())


def parse(body: Any, limits: Limits = LIMITS):  # type: ignore[no-untyped-def]
    return parse_request(json.dumps(body), limits)


def rejected(body: Any, limits: Limits = LIMITS) -> str:
    with pytest.raises(InvalidRequest) as info:
        parse(body, limits)
    assert info.value.status_code == 400
    return str(info.value)


def img2img(image: str = IMAGE, **params: Any) -> dict[str, Any]:
    return {
        "input_data": {"columns": ["prompt", "image"], "data": [{"prompt": "a fox", "image": image}]},
        "parameters": {"num_inference_steps": 10, **params},
    }


def inpaint(image: str = IMAGE, mask: str = MASK, **params: Any) -> dict[str, Any]:
    return {
        "input_data": {"columns": ["prompt", "image", "mask_image"], "data": [["a fox", image, mask]]},
        "parameters": {"num_inference_steps": 10, **params},
    }


# --- the task, in every request form ------------------------------------------------------------

FORMS = {
    "row objects, index, parameters outside": lambda cols, row: {
        "input_data": {"columns": cols, "data": [dict(zip(cols, row, strict=True))], "index": [7]},
        "parameters": {"seed": 5},
    },
    "row lists, no index, parameters inside": lambda cols, row: {
        "input_data": {"columns": cols, "data": [list(row)], "parameters": {"seed": 5}}
    },
    "row objects, no columns": lambda cols, row: {
        "input_data": {"data": [dict(zip(cols, row, strict=True))], "parameters": {"seed": 5}}
    },
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("columns", "task"),
    [
        (["prompt"], "text-to-image"),
        (["prompt", "image"], "image-to-image"),
        (["prompt", "image", "mask_image"], "inpainting"),
    ],
)
def test_task_follows_from_the_columns_in_every_form(form: str, columns: list[str], task: str) -> None:
    values = {"prompt": "a fox", "image": IMAGE, "mask_image": MASK}
    req = parse(FORMS[form](columns, [values[c] for c in columns]))
    row = req.rows[0]
    assert req.spec.task == task
    assert row.seeds == (5,)
    if task == "text-to-image":
        assert row.image is None and row.mask is None and req.spec.strength == 1.0
        return
    assert req.spec.strength == 0.8  # the default for both image tasks
    assert row.image is not None and row.image.mode == "RGB" and row.image.size == (96, 72)
    assert (req.spec.width, req.spec.height) == (96, 72)
    if task == "inpainting":
        assert row.mask is not None and row.mask.mode == "L" and row.mask.size == (96, 72)
    else:
        assert row.mask is None
    assert [t.image for t in row.tasks()] == [row.image]


def test_strength_is_a_parameter_of_both_image_tasks() -> None:
    assert parse(img2img(strength=0.35)).spec.strength == 0.35
    assert parse(inpaint(strength=1.0)).spec.strength == 1.0


def test_requests_of_different_tasks_have_different_specs() -> None:
    # The micro-batcher merges only equal specs: the task and strength are part of them.
    a, b = parse(img2img(height=64, width=64)).spec, parse(inpaint(height=64, width=64)).spec
    c = parse(img2img(height=64, width=64, strength=0.5)).spec
    assert len({a, b, c}) == 3
    assert a == parse(img2img(height=64, width=64)).spec


def test_jpeg_webp_data_urls_and_line_broken_base64_are_accepted() -> None:
    picture = noise(64, 64)
    for text in (
        encode(picture, "JPEG", quality=95),
        encode(picture, "WEBP", lossless=True),
        "data:image/png;base64," + encode(picture),
        base64.encodebytes(base64.b64decode(encode(picture))).decode(),  # newlines every 76 characters
    ):
        assert parse(img2img(text)).rows[0].image.size == (64, 64)  # type: ignore[union-attr]
    lossless = parse(img2img(encode(picture, "WEBP", lossless=True))).rows[0].image
    assert np.array_equal(np.asarray(lossless), np.asarray(picture))


def test_alpha_is_dropped_and_grey_rgb_masks_are_single_channel() -> None:
    rgba = noise(64, 64).convert("RGBA")
    grey_rgb = square_mask(64, 64).convert("RGB")
    row = parse(inpaint(encode(rgba), encode(grey_rgb))).rows[0]
    assert row.image is not None and row.image.mode == "RGB"
    assert row.mask is not None and np.array_equal(np.asarray(row.mask), np.asarray(square_mask(64, 64)))


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: stored 96 wide, shown 96 tall
    text = encode(noise(96, 64), "JPEG", exif=exif.tobytes())
    assert parse(img2img(text)).rows[0].image.size == (64, 96)  # type: ignore[union-attr]


# --- output size ------------------------------------------------------------------------------


def test_output_size_is_the_inputs_rounded_down_to_8_within_the_pixel_cap() -> None:
    assert image_output_size((100, 72), None, None, 1024 * 1024) == (96, 72)
    assert image_output_size((512, 768), None, None, 1024 * 1024) == (512, 768)
    w, h = image_output_size((2000, 1000), None, None, 1024 * 1024)
    assert w % 8 == 0 and h % 8 == 0 and w * h <= 1024 * 1024 and abs(w / h - 2) < 0.02
    assert w * h > 0.95 * 1024 * 1024  # scaled into the cap, not far below it
    w, h = image_output_size((5000, 20), None, None, 64 * 64 * 4)  # extreme aspect: short side stays >= 64
    assert h == 64 and w * h <= 64 * 64 * 4 and w % 8 == 0


def test_big_input_is_scaled_into_the_pixel_cap() -> None:
    req = parse(img2img(encode(noise(400, 200))), Limits(max_pixels=128 * 64))
    assert (req.spec.width, req.spec.height) == (128, 64)
    assert req.rows[0].image.size == (128, 64)  # type: ignore[union-attr]


def test_explicit_height_and_width_resize_the_input() -> None:
    req = parse(inpaint(height=64, width=128))
    assert (req.spec.width, req.spec.height) == (128, 64)
    assert req.rows[0].image.size == (128, 64) and req.rows[0].mask.size == (128, 64)  # type: ignore[union-attr]
    # One side given: the other keeps the aspect ratio (100x72 -> 200x144).
    assert (parse(img2img(width=200)).spec.width, parse(img2img(width=200)).spec.height) == (200, 144)


def test_explicit_size_still_obeys_the_pixel_cap() -> None:
    msg = rejected(img2img(height=1024, width=1536))
    assert "height x width" in msg and "SD_ENDPOINT_MAX_PIXELS" in msg


def test_rows_of_different_sizes_need_an_explicit_size() -> None:
    body = {
        "input_data": {
            "columns": ["prompt", "image"],
            "data": [["a", IMAGE], ["b", encode(noise(64, 64))]],
        }
    }
    msg = rejected(body)
    assert msg.startswith("input_data.data[1].image:") and "height and width" in msg
    body["parameters"] = {"height": 64, "width": 64}
    assert [r.image.size for r in parse(body).rows] == [(64, 64), (64, 64)]  # type: ignore[union-attr]


# --- every bad input is a 400 naming row and field ------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries (almost) no pixel data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_not_base64() -> None:
    msg = rejected(img2img("not base64 at all!"))
    assert msg.startswith("input_data.data[0].image: is not valid base64")


def test_not_an_image() -> None:
    assert rejected(img2img(b64(b"just some text"))).startswith(
        "input_data.data[0].image: is not a PNG, JPEG or WebP image"
    )
    gif = encode(noise(64, 64).convert("P"), "GIF")
    assert "is not a PNG, JPEG or WebP image" in rejected(img2img(gif))
    assert rejected(img2img("")).startswith("input_data.data[0].image: is empty")


def test_truncated_image() -> None:
    data = base64.b64decode(encode(noise(64, 64)))
    msg = rejected(img2img(b64(data[: len(data) // 2])))
    assert msg.startswith("input_data.data[0].image:") and "truncated or corrupt" in msg


def test_decompression_bomb_is_refused_from_its_header_without_decoding() -> None:
    # 5000x5000 declared, a few bytes of data: decoding would fail as "truncated"; the header check
    # answers first, naming the pixel count and the setting.
    msg = rejected(img2img(b64(png_header_only(5000, 5000))), Limits(max_input_pixels=4096 * 4096))
    assert msg.startswith("input_data.data[0].image: image declares 5000x5000 = 25000000 pixels")
    assert "SD_ENDPOINT_MAX_INPUT_PIXELS" in msg and "not decoded" in msg
    # Past Pillow's own bomb guard (2 x 89.5 Mpx): the same 400, not a crash.
    assert "SD_ENDPOINT_MAX_INPUT_PIXELS" in rejected(img2img(b64(png_header_only(20_000, 20_000))))
    # A bomb mask is caught the same way.
    msg = rejected(inpaint(mask=b64(png_header_only(5000, 5000))), Limits(max_input_pixels=4096 * 4096))
    assert msg.startswith("input_data.data[0].mask_image: image declares 5000x5000")


def test_image_over_the_byte_cap() -> None:
    msg = rejected(img2img(), Limits(max_image_bytes=2048))
    assert msg.startswith("input_data.data[0].image: image is about") and "SD_ENDPOINT_MAX_IMAGE_BYTES" in msg


def test_mask_of_another_size() -> None:
    msg = rejected(inpaint(mask=encode(square_mask(64, 64))))
    assert msg.startswith("input_data.data[0].mask_image: is 64x64 but the image is 100x72")


def test_mask_that_is_not_single_channel() -> None:
    colour = square_mask().convert("RGB")
    colour.putpixel((0, 0), (255, 0, 0))
    msg = rejected(inpaint(mask=encode(colour)))
    assert msg.startswith("input_data.data[0].mask_image: is a colour image")
    deep = Image.fromarray(np.full((72, 100), 40000, dtype=np.uint16))
    assert rejected(inpaint(mask=encode(deep))).startswith("input_data.data[0].mask_image: has I")


@pytest.mark.parametrize("strength", [1.5, -0.1])
def test_strength_out_of_range(strength: float) -> None:
    msg = rejected(img2img(strength=strength))
    assert msg.startswith("Invalid request: parameters.strength:") and f"(got {strength})" in msg


def test_strength_that_leaves_no_step() -> None:
    msg = rejected(img2img(strength=0.05))  # int(10 x 0.05) = 0 steps
    assert msg.startswith("parameters.strength: 0.05 x num_inference_steps 10 leaves no denoising step")


def test_strength_without_an_image() -> None:
    body = {"input_data": {"columns": ["prompt"], "data": ["a"]}, "parameters": {"strength": 0.5}}
    assert rejected(body).startswith("parameters.strength: applies only to image-to-image and inpainting")


def test_mask_without_image() -> None:
    body = {"input_data": {"columns": ["prompt", "mask_image"], "data": [["a", MASK]]}}
    assert rejected(body).startswith("input_data.data[0].mask_image: given without an image")


@pytest.mark.parametrize(
    "second",
    [{"prompt": "b"}, {"prompt": "b", "image": IMAGE, "mask_image": MASK}, {"prompt": "b", "image": None}],
)
def test_mixed_tasks_in_one_request(second: dict[str, Any]) -> None:
    body = {"input_data": {"data": [{"prompt": "a", "image": IMAGE}, second]}}
    msg = rejected(body)
    assert msg.startswith("input_data.data[1]: is a ") and "one request holds one task" in msg


def test_image_urls_are_not_fetched() -> None:
    msg = rejected(img2img("https://example.com/cat.png"))
    assert msg.startswith("input_data.data[0].image: image URLs are not fetched") and "base64" in msg


def test_image_of_the_wrong_type_names_the_row() -> None:
    msg = rejected(img2img(42))  # type: ignore[arg-type]
    assert msg.startswith("Invalid request: input_data.data[0].image:")
