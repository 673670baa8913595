"""The wire contract: every request form Azure clients send, and every bad input as a named 400."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sd_endpoint.contract import Limits
from sd_endpoint.errors import InvalidRequest, PayloadTooLarge
from sd_endpoint.request_parsing import decode_body, parse_request

LIMITS = Limits(max_images=8, max_pixels=1024 * 1024, max_steps=150, max_prompt_chars=2000)


def parse(body: Any, limits: Limits = LIMITS):  # type: ignore[no-untyped-def]
    return parse_request(json.dumps(body) if not isinstance(body, (str, bytes)) else body, limits)


# --- the forms of azure-contract.md section 1.2 ------------------------------------------------


def test_model_card_form_uses_sd21_defaults() -> None:
    req = parse({"input_data": {"columns": ["prompt"], "data": ["an astronaut riding a horse"], "index": [0]}})
    assert [r.prompt for r in req.rows] == ["an astronaut riding a horse"]
    assert req.rows[0].index == 0
    spec = req.spec
    assert (spec.height, spec.width, spec.steps, spec.guidance_scale, spec.scheduler) == (768, 768, 50, 7.5, "ddim")
    assert req.output_format == "png"
    assert len(req.rows[0].seeds) == 1


def test_parameters_inside_input_data() -> None:
    req = parse(
        {
            "input_data": {
                "columns": ["prompt"],
                "data": ["a"],
                "index": [0],
                "parameters": {"num_inference_steps": 20, "guidance_scale": 5.0},
            }
        }
    )
    assert (req.spec.steps, req.spec.guidance_scale) == (20, 5.0)


def test_parameters_at_top_level_and_row_objects_with_negative_prompt() -> None:
    req = parse(
        {
            "input_data": {
                "columns": ["prompt", "negative_prompt"],
                "data": [{"prompt": "a horse", "negative_prompt": "blurry"}, {"prompt": "a bike"}],
            },
            "parameters": {"num_inference_steps": 10, "negative_prompt": "low quality"},
        }
    )
    assert [(r.prompt, r.negative_prompt, r.index) for r in req.rows] == [
        ("a horse", "blurry", 0),
        ("a bike", "low quality", 1),  # the parameter is the default for rows without their own
    ]


def test_row_lists_matched_against_columns_with_seed_column() -> None:
    req = parse(
        {
            "input_data": {
                "columns": ["prompt", "negative_prompt", "seed"],
                "data": [["a cat", "dogs", 7], ["a dog", None, None]],
                "index": ["first", "second"],
            },
            "parameters": {"seed": 100},
        }
    )
    assert [(r.prompt, r.negative_prompt, r.seeds, r.index) for r in req.rows] == [
        ("a cat", "dogs", (7,), "first"),
        ("a dog", None, (100,), "second"),
    ]


def test_num_images_per_prompt_gives_consecutive_seeds_per_row() -> None:
    req = parse({"input_data": {"data": ["a", "b"]}, "parameters": {"seed": 5, "num_images_per_prompt": 3}})
    assert [r.seeds for r in req.rows] == [(5, 6, 7), (5, 6, 7)]
    assert req.image_count == 6


def test_seed_is_drawn_when_absent_and_differs_between_requests() -> None:
    seeds = {parse({"input_data": {"data": ["a"]}}).rows[0].seeds[0] for _ in range(5)}
    assert len(seeds) > 1
    assert all(0 <= s < 2**31 for s in seeds)


def test_all_parameters_accepted() -> None:
    req = parse(
        {
            "input_data": {"data": ["a"]},
            "parameters": {
                "num_inference_steps": 25,
                "guidance_scale": 9,
                "negative_prompt": "x",
                "height": 512,
                "width": 640,
                "num_images_per_prompt": 2,
                "seed": 3,
                "scheduler": "dpm_solver_multistep",
                "output_format": "webp",
                "eta": 0,
            },
        }
    )
    assert req.spec.height == 512 and req.spec.width == 640 and req.spec.guidance_scale == 9.0
    assert req.spec.scheduler == "dpm_solver_multistep" and req.output_format == "webp"


def test_eta_with_ddim() -> None:
    assert parse({"input_data": {"data": ["a"]}, "parameters": {"eta": 0.5}}).spec.eta == 0.5


def test_an_empty_negative_prompt_is_none_and_overrides_the_default() -> None:
    body = {"input_data": {"data": [{"prompt": "a", "negative_prompt": ""}]}, "parameters": {"negative_prompt": "x"}}
    assert parse(body).rows[0].negative_prompt is None


# --- bad input: each a 400 naming the field and what is allowed ---------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("{", "not valid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        ("", "empty"),
        ("[]", "must be a JSON object"),
        ('"input_data"', "must be a JSON object"),
        ({"data": ["a"]}, 'Missing "input_data"'),
        ({"input_data": {"data": []}}, "input_data.data: must hold at least one row"),
        ({"input_data": {"columns": ["prompt"]}}, "input_data.data: is required"),
        ({"input_data": {"data": ["a"], "index": [0, 1]}}, "index has 2 entries but input_data.data has 1"),
        ({"input_data": {"columns": ["prompt", "negative_prompt"], "data": [["a"]]}}, "has 1 values"),
        ({"input_data": {"columns": ["text"], "data": ["a"]}}, "unknown column(s) 'text'; allowed: prompt"),
        ({"input_data": {"columns": ["negative_prompt"], "data": [["a"]]}}, "must include 'prompt'"),
        ({"input_data": {"data": [{"negative_prompt": "a"}]}}, "missing 'prompt'"),
        ({"input_data": {"data": [{"prompt": "a", "promt": "b"}]}}, "unknown key(s) 'promt'"),
        ({"input_data": {"data": [["a"]]}}, "needs input_data.columns"),
        ({"input_data": {"data": [1]}}, "input_data.data[0]: must be a string, an object or a list"),
        ({"input_data": {"data": ["a", None]}}, "input_data.data[1]: must be a string, an object or a list (got null)"),
        ({"input_data": {"data": ["a"], "index": [True]}}, "input_data.index[0]: must be an integer or a string"),
        ({"input_data": {"data": ["a"], "index": [1.5]}}, "input_data.index[0]: must be an integer or a string"),
        ({"input_data": {"data": ["  "]}}, "input_data.data[0].prompt: must not be empty"),
        ({"input_data": {"data": [{"prompt": 3}]}}, "input_data.data[0].prompt"),
        ({"input_data": {"data": ["a"]}, "extra": 1}, "unknown field 'extra'; allowed: input_data, parameters"),
        (
            {"input_data": {"data": ["a"]}, "parameters": {"guidence_scale": 7}},
            "unknown field 'guidence_scale'; allowed: cache_interval, eta, guidance_scale",
        ),
        ({"input_data": {"data": ["a"]}, "parameters": {"num_inference_steps": 0}}, "num_inference_steps"),
        ({"input_data": {"data": ["a"]}, "parameters": {"num_inference_steps": 151}}, "between 1 and 150"),
        (
            {"input_data": {"data": ["a"], "parameters": {"num_inference_steps": 151}}},
            "input_data.parameters.num_inference_steps: must be between 1 and 150",
        ),
        ({"input_data": {"data": ["a"]}, "parameters": {"num_inference_steps": "5"}}, "valid integer"),
        ({"input_data": {"data": ["a"]}, "parameters": {"num_inference_steps": 5.5}}, "valid integer"),
        ({"input_data": {"data": ["a"]}, "parameters": {"num_inference_steps": True}}, "valid integer"),
        ({"input_data": {"data": ["a"]}, "parameters": {"guidance_scale": 51}}, "less than or equal to 50"),
        ({"input_data": {"data": ["a"]}, "parameters": {"guidance_scale": -1}}, "greater than or equal to 0"),
        ({"input_data": {"data": ["a"]}, "parameters": {"height": 100}}, "height: must be a multiple of 8"),
        ({"input_data": {"data": ["a"]}, "parameters": {"width": 32}}, "width"),
        ({"input_data": {"data": ["a"]}, "parameters": {"height": 2048, "width": 2048}}, "over the limit"),
        ({"input_data": {"data": ["a"]}, "parameters": {"scheduler": "heun"}}, "'ddim', 'dpm_solver_multistep'"),
        ({"input_data": {"data": ["a"]}, "parameters": {"output_format": "gif"}}, "'png', 'jpeg' or 'webp'"),
        ({"input_data": {"data": ["a"]}, "parameters": {"seed": -1}}, "seed"),
        ({"input_data": {"data": ["a"]}, "parameters": {"seed": 2**64}}, "seed"),
        ({"input_data": {"data": ["a"]}, "parameters": {"eta": 0.5, "scheduler": "euler"}}, "would ignore it"),
        ({"input_data": {"data": ["a"]}, "parameters": {"eta": 2}}, "eta"),
        ({"input_data": {"data": ["a"] * 9}}, "asks for 9 images"),
        ({"input_data": {"data": ["a"]}, "parameters": {"num_images_per_prompt": 9}}, "asks for 9 images"),
        ({"input_data": {"data": ["a"] * 3}, "parameters": {"num_images_per_prompt": 3}}, "the limit is 8"),
        (
            {"input_data": {"data": ["a"]}, "parameters": {"guidance_scale": 1, "negative_prompt": "x"}},
            "no effect when guidance_scale <= 1",
        ),
        (
            {"input_data": {"data": ["a"], "parameters": {}}, "parameters": {}},
            "given both at the top level and inside",
        ),
        ({"input_data": {"data": ["a" * 2001]}}, "at most 2000 characters"),
        ({"input_data": {"data": ["a"]}, "parameters": {"negative_prompt": "n" * 2001}}, "at most 2000"),
    ],
)
def test_bad_input_is_a_named_400(body: Any, expected: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(body)
    assert info.value.status_code == 400
    assert expected in info.value.message
    assert info.value.body() == {"message": info.value.message}


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(constant: str) -> None:
    body = '{"input_data": {"data": ["a"]}, "parameters": {"guidance_scale": ' + constant + "}}"
    with pytest.raises(InvalidRequest, match="not a number JSON allows"):
        parse(body)


def test_body_size_limit_is_413() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        decode_body(b"x" * 2000, max_bytes=1000)
    assert info.value.status_code == 413
    assert not isinstance(info.value, InvalidRequest)  # `except InvalidRequest` (bad fields) must not take a 413
    assert "2000 bytes" in info.value.message and "1000" in info.value.message


def test_error_messages_never_echo_prompt_text() -> None:
    secret = "my very private prompt " * 100
    with pytest.raises(InvalidRequest) as info:
        parse({"input_data": {"data": [secret]}})
    assert "private" not in info.value.message


def test_pixel_cap_comes_from_limits() -> None:
    small = Limits(max_pixels=256 * 256)
    with pytest.raises(InvalidRequest, match="SD_ENDPOINT_MAX_PIXELS"):
        parse({"input_data": {"data": ["a"]}, "parameters": {"height": 512, "width": 512}}, small)
    assert parse({"input_data": {"data": ["a"]}, "parameters": {"height": 256, "width": 256}}, small).spec.height == 256
