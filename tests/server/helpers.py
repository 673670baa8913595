"""Data and small helpers for the server tests: the bad inputs every envelope must refuse, image decoding.

The fake backend and the live-server starter are in ``tests.support``.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from PIL import Image


def decode_image(record: dict[str, Any]) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(record["generated_image"], validate=True)))
    image.load()
    return image


def _body(parameters: dict[str, Any] | None = None, **input_data: Any) -> bytes:
    data: dict[str, Any] = {"columns": ["prompt"], "data": ["a cat"], **input_data}
    body: dict[str, Any] = {"input_data": data}
    if parameters is not None:
        body["parameters"] = parameters
    return json.dumps(body).encode()


# Every bad input of the core issue: (case, raw body, text the 400 message must contain).
BAD_INPUTS: list[tuple[str, bytes, str]] = [
    ("malformed JSON", b'{"input_data": {"columns": ["prompt"], "data": ["a cat"]', "not valid JSON"),
    ("empty body", b"", "empty"),
    ("non-UTF-8", b'{"input_data": {"columns": ["prompt"], "data": ["caf\xe9"]}}', "UTF-8"),
    ("JSON array", b'[{"prompt": "a cat"}]', "JSON object"),
    ("missing input_data", b'{"data": ["a cat"]}', "input_data"),
    ("missing prompt column", _body(columns=["negative_prompt"], data=[["blurry"]]), "prompt"),
    ("row without prompt", _body(columns=["prompt", "negative_prompt"], data=[{"negative_prompt": "x"}]), "prompt"),
    ("index/data length mismatch", _body(index=[0, 1]), "input_data.index"),
    ("empty data", _body(data=[]), "input_data.data"),
    ("data not a list", _body(data="a cat"), "input_data.data"),
    ("prompt not a string", _body(data=[42]), "input_data.data[0]"),
    ("steps of the wrong type", _body({"num_inference_steps": "ten"}), "num_inference_steps"),
    ("steps as a boolean", _body({"num_inference_steps": True}), "num_inference_steps"),
    ("steps out of range", _body({"num_inference_steps": 1000}), "num_inference_steps"),
    (
        "guidance NaN",
        b'{"input_data": {"columns": ["prompt"], "data": ["a"]}, "parameters": {"guidance_scale": NaN}}',
        "NaN",
    ),
    ("guidance Infinity", _body({"guidance_scale": 1e309}), "Infinity"),
    ("guidance out of range", _body({"guidance_scale": 51}), "guidance_scale"),
    ("height not a multiple of 8", _body({"height": 100}), "multiple of 8"),
    ("width too small", _body({"width": 32}), "width"),
    ("too many pixels", _body({"height": 2048, "width": 2048}), "SD_ENDPOINT_MAX_PIXELS"),
    ("unknown scheduler", _body({"scheduler": "k_fancy"}), "scheduler"),
    ("unknown parameter", _body({"guidence_scale": 7.5}), "guidence_scale"),
    ("unknown top-level key", b'{"input_data": {"columns": ["prompt"], "data": ["a"]}, "extra": 1}', "extra"),
    ("too many images", _body({"num_images_per_prompt": 3}, data=["a", "b", "c"]), "MAX_IMAGES_PER_REQUEST"),
    ("negative seed", _body({"seed": -1}), "seed"),
    ("blank prompt", _body(data=["   "]), "prompt"),
    ("100 kB prompt", _body(data=["x" * 100_000]), "20000 characters"),
]
