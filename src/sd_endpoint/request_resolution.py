"""A request body to a ``ScoringRequest``, second step: from validated rows and parameters to the work.

``request_parsing`` hands over the rows in one form whatever form the body used; here the defaults are
filled in (from ``contract.Limits``), the rules that span fields are checked (one task per request, steps x
strength, images per request, a negative prompt with guidance, pixels), input images are decoded and
sized, and every image gets its seed. Every refusal is an ``InvalidRequest`` that names the field.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from sd_endpoint import images_in
from sd_endpoint.contract import (
    DEFAULT_STRENGTH,
    MAX_SEED,
    MAX_SIDE,
    MIN_SIDE,
    Limits,
    Parameters,
    Row,
    RowRequest,
    ScoringRequest,
)
from sd_endpoint.errors import InvalidRequest
from sd_endpoint.jobs import SCHEDULERS_WITH_ETA, GenerationSpec, SchedulerName, TaskName

if TYPE_CHECKING:
    from PIL import Image

# A row's input image and mask, decoded (None, None for text-to-image).
_Inputs = tuple["Image.Image | None", "Image.Image | None"]


def resolve(
    params: Parameters, where: str, rows: Sequence[Row], labels: Sequence[int | str], limits: Limits
) -> ScoringRequest:
    """The request's spec and rows; ``where`` names the parameters in messages, ``labels`` the rows.

    The checks run cheapest first and in a fixed order, so a request with several faults always gets the
    same message.
    """
    task = _task_of(rows)
    steps = params.num_inference_steps or limits.default_steps
    if steps > limits.max_steps:
        raise InvalidRequest(f"{where}.num_inference_steps: must be between 1 and {limits.max_steps} (got {steps}).")
    guidance = limits.default_guidance_scale if params.guidance_scale is None else params.guidance_scale
    scheduler: SchedulerName = params.scheduler or "ddim"
    eta = params.eta or 0.0
    if eta and scheduler not in SCHEDULERS_WITH_ETA:
        raise InvalidRequest(
            f"{where}.eta: only the {', '.join(sorted(SCHEDULERS_WITH_ETA))} scheduler uses eta; "
            f"'{scheduler}' would ignore it. Leave eta out or use scheduler 'ddim'."
        )
    strength = _strength(task, params, steps, where)
    total = len(rows) * params.num_images_per_prompt
    if total > limits.max_images:
        raise InvalidRequest(
            f"The request asks for {total} images ({len(rows)} rows x num_images_per_prompt "
            f"{params.num_images_per_prompt}); the limit is {limits.max_images} "
            "(SD_ENDPOINT_MAX_IMAGES_PER_REQUEST)."
        )
    negatives = [_negative(pos, row, params, guidance) for pos, row in enumerate(rows)]
    # Images last: decoding is the expensive check.
    inputs, (width, height) = _inputs_and_size(task, rows, params, limits)
    if height * width > limits.max_pixels:
        raise InvalidRequest(
            f"{where}.height x width: {height}x{width} = {height * width} pixels is over the limit of "
            f"{limits.max_pixels} (SD_ENDPOINT_MAX_PIXELS)."
        )
    resolved = tuple(
        _row_request(pos, row, labels[pos], negatives[pos], inputs[pos], params, (width, height))
        for pos, row in enumerate(rows)
    )
    spec = GenerationSpec(
        height,
        width,
        steps,
        float(guidance),
        scheduler,
        float(eta),
        task,
        float(strength),
        cache_interval=params.cache_interval or 1,
    )
    return ScoringRequest(spec, params.output_format, resolved)


def _task_of(rows: Sequence[Row]) -> TaskName:
    """The one task of a request, from which image columns its rows fill."""
    for pos, row in enumerate(rows):
        if row.mask_image is not None and row.image is None:
            raise InvalidRequest(
                f"input_data.data[{pos}].mask_image: given without an image; inpainting needs both "
                "'image' and 'mask_image' (image-to-image needs only 'image')."
            )
    first = rows[0].task
    for pos, row in enumerate(rows):
        if row.task != first:
            raise InvalidRequest(
                f"input_data.data[{pos}]: is a {row.task} row but input_data.data[0] is {first}; "
                "one request holds one task (rows with 'image', with 'image' and 'mask_image', or with neither): "
                "send them as separate requests."
            )
    return first


def _strength(task: TaskName, params: Parameters, steps: int, where: str) -> float:
    """How much of the schedule runs: all of it for text-to-image, else ``strength`` (default 0.8)."""
    if task == "text-to-image":
        if params.strength is not None:
            raise InvalidRequest(
                f"{where}.strength: applies only to image-to-image and inpainting (rows with an 'image'); "
                "leave it out for text-to-image."
            )
        return 1.0
    strength = DEFAULT_STRENGTH if params.strength is None else params.strength
    if min(int(steps * strength), steps) < 1:
        raise InvalidRequest(
            f"{where}.strength: {strength} x num_inference_steps {steps} leaves no denoising step; "
            "raise strength or num_inference_steps."
        )
    return strength


def _negative(pos: int, row: Row, params: Parameters, guidance: float) -> str | None:
    """The row's negative prompt, else the parameters' default; refused where guidance would ignore it."""
    negative = row.negative_prompt if row.negative_prompt is not None else params.negative_prompt
    if negative and guidance <= 1.0:
        raise InvalidRequest(
            f"input_data.data[{pos}]: a negative_prompt has no effect when guidance_scale <= 1 "
            f"(got {guidance}); raise guidance_scale or leave the negative prompt out."
        )
    return negative or None


def _inputs_and_size(
    task: TaskName, rows: Sequence[Row], params: Parameters, limits: Limits
) -> tuple[list[_Inputs], tuple[int, int]]:
    """Each row's decoded input image and mask, and the output's (width, height)."""
    if task == "text-to-image":
        size = (params.width or limits.default_width, params.height or limits.default_height)
        return [(None, None)] * len(rows), size
    inputs: list[_Inputs] = [_row_images(pos, row, limits) for pos, row in enumerate(rows)]
    return inputs, _image_output_size(inputs, params, limits)


def _row_request(
    pos: int,
    row: Row,
    label: int | str,
    negative: str | None,
    inputs: _Inputs,
    params: Parameters,
    size: tuple[int, int],
) -> RowRequest:
    """The row with its seeds (its own, else the parameters', else drawn) and its images at the output size."""
    base = row.seed if row.seed is not None else params.seed
    if base is None:
        base = secrets.randbelow(2**31)
    seeds = tuple((base + k) % (MAX_SEED + 1) for k in range(params.num_images_per_prompt))
    image, mask = inputs
    if image is not None:
        image = images_in.resized(image, *size)
    if mask is not None:
        mask = images_in.resized(mask, *size)
    return RowRequest(pos, label, row.prompt, negative, seeds, image, mask)


def _row_images(pos: int, row: Row, limits: Limits) -> tuple[Image.Image, Image.Image | None]:
    """The row's input image (RGB) and mask (L), decoded and checked, at their own size."""
    where = f"input_data.data[{pos}]"
    assert row.image is not None
    image = _load_image(f"{where}.image", row.image, limits, images_in.as_rgb)
    if row.mask_image is None:
        return image, None
    mask = _load_image(f"{where}.mask_image", row.mask_image, limits, images_in.as_mask)
    if mask.size != image.size:
        raise InvalidRequest(
            f"{where}.mask_image: is {mask.size[0]}x{mask.size[1]} but the image is "
            f"{image.size[0]}x{image.size[1]}; the mask must be the same size as the image."
        )
    return image, mask


def _load_image(where: str, text: str, limits: Limits, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    try:
        return convert(images_in.open_image(images_in.decode_base64(text, limits.images), limits.images))
    except images_in.ImageInputError as exc:
        raise InvalidRequest(f"{where}: {exc}.") from None


def _image_output_size(inputs: list[_Inputs], params: Parameters, limits: Limits) -> tuple[int, int]:
    """(width, height) of the output: the input's size (see ``image_output_size``), the same for every row."""
    sizes = []
    for image, _mask in inputs:
        assert image is not None
        sizes.append(image_output_size(image.size, params.width, params.height, limits.max_pixels))
    for pos, size in enumerate(sizes):
        if size != sizes[0]:
            w0, h0 = inputs[0][0].size if inputs[0][0] is not None else (0, 0)
            raise InvalidRequest(
                f"input_data.data[{pos}].image: gives a {size[0]}x{size[1]} output but input_data.data[0].image "
                f"({w0}x{h0}) gives {sizes[0][0]}x{sizes[0][1]}; one request makes one size. Set parameters "
                "height and width to resize every image to them, or send the rows separately."
            )
    return sizes[0]


def image_output_size(
    size: tuple[int, int], want_width: int | None, want_height: int | None, max_pixels: int
) -> tuple[int, int]:
    """(width, height) for an input image of ``size``.

    Without height/width: the input's own size, scaled down into the pixel cap and rounded down to a
    multiple of 8 - what diffusers' image processor does, so the output equals diffusers' given the
    original picture. With one of them, the other keeps the aspect ratio.
    """
    width, height = size
    if want_width is not None and want_height is not None:
        return want_width, want_height
    if want_width is not None:
        return want_width, _side(height * want_width / width)
    if want_height is not None:
        return _side(width * want_height / height), want_height
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    w, h = _side(width * scale), _side(height * scale)
    while w * h > max_pixels:  # an extreme aspect ratio whose short side was raised to MIN_SIDE
        if w >= h:
            w -= 8
        else:
            h -= 8
    return w, h


def _side(value: float) -> int:
    return min(MAX_SIDE, max(MIN_SIDE, int(value) // 8 * 8))
