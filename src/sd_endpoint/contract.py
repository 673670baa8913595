"""The scoring contract: every request form Azure clients send, validated once, here.

Accepted request bodies (azure-contract.md section 1.2)::

    {"input_data": {"columns": ["prompt"], "data": ["a cat"], "index": [0]}}
    {"input_data": {"columns": ["prompt"], "data": ["a cat"], "parameters": {"num_inference_steps": 30}}}
    {"input_data": {"columns": ["prompt", "negative_prompt"],
                    "data": [{"prompt": "a cat", "negative_prompt": "blurry"}]}, "parameters": {...}}
    {"input_data": {"columns": ["prompt", "negative_prompt", "seed"], "data": [["a cat", "blurry", 7]]}}

The task follows from the columns, in any of those forms (Azure's image-text-to-image and inpainting
contracts): an ``image`` column (base64 PNG/JPEG/WebP) makes it image-to-image, ``image`` + ``mask_image``
(white = repaint) inpainting; every row of a request has the same task. ``parameters.strength`` (0..1,
default 0.8) is how much of the schedule runs from the noised input. Without height/width the output has
the input's size (scaled into SD_ENDPOINT_MAX_PIXELS, rounded down to a multiple of 8); with them the input
is resized. Images are decoded and checked here (``images_in``), so the backend gets ready PIL images.

The response is a JSON array with one ``ImageRecord`` per generated image, in input order.
Unknown keys are errors that list the allowed ones: Azure ignores them silently, and a typo such as
``guidence_scale`` would otherwise quietly use the default.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from sd_endpoint import images_in
from sd_endpoint.errors import InvalidRequest, PayloadTooLarge
from sd_endpoint.jobs import (
    MAX_CACHE_INTERVAL,
    SCHEDULERS_WITH_ETA,
    GenerationSpec,
    ImageTask,
    SchedulerName,
    TaskName,
)

if TYPE_CHECKING:
    from PIL import Image

OutputFormat = Literal["png", "jpeg", "webp"]
COLUMNS = ("prompt", "negative_prompt", "seed", "image", "mask_image")
DEFAULT_STRENGTH = 0.8
MAX_SEED = 2**63 - 1
MIN_SIDE = 64
MAX_SIDE = 4096
MAX_GUIDANCE = 50.0
# Deepest JSON nesting accepted. A valid request nests 4 levels ({"input_data": {"data": [[...]]}}); the
# bound keeps every later walk (pydantic, our own) far from Python's recursion limit.
MAX_JSON_DEPTH = 32


@dataclass(frozen=True)
class Limits:
    """Bounds and defaults that come from settings and from the loaded model."""

    max_images: int = 8
    max_pixels: int = 1024 * 1024
    max_steps: int = 150
    max_prompt_chars: int = 20_000
    default_height: int = 768
    default_width: int = 768
    default_steps: int = 50
    default_guidance_scale: float = 7.5
    max_image_bytes: int = 10_000_000
    max_input_pixels: int = 4096 * 4096

    @property
    def images(self) -> images_in.ImageLimits:
        return images_in.ImageLimits(self.max_image_bytes, self.max_input_pixels)


def _json_kind(value: Any) -> str | None:
    """The JSON type of a value, as the tag of the union member that takes it (None: no member does)."""
    if isinstance(value, bool):
        return None  # strict: true is not 1
    kinds = ((str, "string"), (dict, "object"), (list, "array"), (int, "integer"))
    return next((name for cls, name in kinds if isinstance(value, cls)), None)


# A row is a prompt string, an object or a list; a row label an integer or a string. Unions tagged with our
# own names, so that a value no member takes is one error of our own type, whatever pydantic's wording.
RowValue = Annotated[
    Annotated[str, Tag("string")] | Annotated[dict[str, Any], Tag("object")] | Annotated[list[Any], Tag("array")],
    Discriminator(
        _json_kind, custom_error_type="row_type", custom_error_message="must be a string, an object or a list"
    ),
]
RowLabel = Annotated[
    Annotated[int, Tag("integer")] | Annotated[str, Tag("string")],
    Discriminator(_json_kind, custom_error_type="label_type", custom_error_message="must be an integer or a string"),
]


def _text_check(*, allow_empty: bool) -> AfterValidator:
    return AfterValidator(lambda value, info: _check_text(value, info, allow_empty=allow_empty))


PromptText = Annotated[str, _text_check(allow_empty=False)]
NegativeText = Annotated[str | None, _text_check(allow_empty=True)]


class Parameters(BaseModel):
    """Generation parameters, in ``input_data.parameters`` (the model card's form) or at the top level."""

    model_config = ConfigDict(extra="forbid", strict=True)

    num_inference_steps: int | None = Field(None, ge=1, description="Denoising steps (default 50).")
    guidance_scale: float | None = Field(
        None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False, description="Classifier-free guidance (7.5)."
    )
    negative_prompt: NegativeText = Field(None, description="Default negative prompt for rows without one.")
    height: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, description="Pixels, a multiple of 8.")
    width: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, description="Pixels, a multiple of 8.")
    num_images_per_prompt: int = Field(1, ge=1, description="Images per row; seeds are seed, seed+1, ...")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed for rows without their own.")
    scheduler: SchedulerName | None = Field(None, description="Default: the model's own (DDIM for SD 2.1).")
    output_format: OutputFormat = Field("png", description="Encoding of generated_image.")
    eta: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False, description="DDIM eta (0).")
    cache_interval: int | None = Field(
        None,
        ge=1,
        le=MAX_CACHE_INTERVAL,
        description="DeepCache: the full UNet every N steps, its deep features reused in between (1: off).",
    )
    strength: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Image-to-image and inpainting: how far to move from the input image (0.8).",
    )

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8 (got {value})")
        return value


class Row(BaseModel):
    """One input row: a prompt, and optionally its own negative prompt, seed, input image and mask."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: PromptText
    negative_prompt: NegativeText = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    image: str | None = Field(None, description="Base64 PNG/JPEG/WebP: image-to-image (or inpainting with a mask).")
    mask_image: str | None = Field(None, description="Base64 mask, same size as image: white = repaint.")

    @property
    def task(self) -> TaskName:
        if self.image is None:
            return "text-to-image"
        return "image-to-image" if self.mask_image is None else "inpainting"


class InputData(BaseModel):
    """pandas "split" orientation, as Azure ML clients send it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    columns: list[str] | None = Field(None, description="Column names; 'prompt' is required.")
    data: list[RowValue] = Field(description="One entry per row.")
    index: list[RowLabel] | None = Field(None, description="Row labels, echoed in each record.")
    parameters: Parameters | None = None


class ScoreRequest(BaseModel):
    """The request body."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"input_data": {"columns": ["prompt"], "data": ["an astronaut riding a horse"], "index": [0]}},
                {
                    "input_data": {
                        "columns": ["prompt", "negative_prompt"],
                        "data": [{"prompt": "a lighthouse at dawn", "negative_prompt": "blurry"}],
                        "parameters": {"num_inference_steps": 30, "guidance_scale": 7.5, "seed": 42},
                    }
                },
            ]
        },
    )

    input_data: InputData
    parameters: Parameters | None = None


class ImageRecord(BaseModel):
    """One generated image. ``generated_image`` is "" when content screening blocked it."""

    prompt: str
    generated_image: str = Field(description="Standard base64 of the encoded image, no newlines.")
    nsfw_content_detected: bool | None = Field(description="null unless content screening ran.")
    seed: int = Field(description="The seed that produced this image; send it back to reproduce it.")
    index: int | str = Field(description="The index of the input row this image belongs to.")
    warnings: list[str] | None = Field(None, description="E.g. the prompt was cut to the 77-token window.")
    blocked: dict[str, Any] | None = Field(None, description="Why screening blocked this row.")


class ErrorBody(BaseModel):
    """Every error response."""

    message: str


# ------------------------------------------------------------------------------------------------
# Parsed form handed to the service


@dataclass(frozen=True)
class RowRequest:
    """A validated input row with its seeds resolved (and its input image and mask decoded and sized)."""

    position: int
    index: int | str
    prompt: str
    negative_prompt: str | None
    seeds: tuple[int, ...]  # one per image of this row
    image: Image.Image | None = field(default=None, repr=False)
    mask: Image.Image | None = field(default=None, repr=False)

    def tasks(self) -> list[ImageTask]:
        return [ImageTask(self.prompt, self.negative_prompt, seed, self.image, self.mask) for seed in self.seeds]


@dataclass(frozen=True)
class ScoringRequest:
    spec: GenerationSpec
    output_format: OutputFormat
    rows: tuple[RowRequest, ...]

    @property
    def image_count(self) -> int:
        return sum(len(r.seeds) for r in self.rows)


def _check_text(value: str | None, info: ValidationInfo, *, allow_empty: bool) -> str | None:
    if value is None:
        return None
    if not allow_empty and not value.strip():
        raise ValueError("must not be empty")
    bad = unencodable_at(value)
    if bad is not None:
        # JSON's "\ud800" escape decodes to a lone surrogate: no tokenizer can encode it.
        raise ValueError(f"holds a lone UTF-16 surrogate at character {bad}, which is not text")
    limits: Limits = (info.context or {}).get("limits", Limits())
    if len(value) > limits.max_prompt_chars:
        raise ValueError(f"must be at most {limits.max_prompt_chars} characters (got {len(value)})")
    return value


def unencodable_at(text: str) -> int | None:
    """Index of the first character that UTF-8 cannot encode (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_STEP = np.zeros(256, dtype=np.int32)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def json_depth(text: str) -> int:
    """How deep the brackets of a JSON text nest, counted without parsing (no recursion, no Python loop)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    return int(np.cumsum(_STEP[np.frombuffer(brackets, dtype=np.uint8)]).max())


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def decode_body(body: bytes | str, *, max_bytes: int | None = None) -> Any:
    """Bytes or text to a JSON value, refusing non-UTF-8, NaN and Infinity."""
    if max_bytes is not None and len(body) > max_bytes:
        raise PayloadTooLarge(f"Request body is {len(body)} bytes; the limit is {max_bytes}.")
    if isinstance(body, bytes):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"Request body is not valid UTF-8: {exc}.") from None
    else:
        text = body
    if not text.strip():
        raise InvalidRequest('Request body is empty; expected a JSON object with "input_data".')
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise InvalidRequest(f"Request body nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted.")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}.") from None


def parse_request(body: bytes | str | Any, limits: Limits, *, decoded: bool = False) -> ScoringRequest:
    """Validate a request body into a ScoringRequest: raw bytes/text, or (``decoded``) a parsed JSON value."""
    payload = body if decoded or not isinstance(body, (bytes, str)) else decode_body(body)
    if not isinstance(payload, dict):
        raise InvalidRequest(f'Request body must be a JSON object with "input_data"; got a JSON {_json_type(payload)}.')
    if "input_data" not in payload:
        raise InvalidRequest('Missing "input_data": expected {"input_data": {"columns": ["prompt"], "data": ["..."]}}.')
    _check_strings(payload, "", 0)
    try:
        request = ScoreRequest.model_validate(payload, context={"limits": limits})
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from None
    return _resolve(request, limits)


def _check_strings(value: Any, path: str, depth: int, *, strings: bool = True) -> None:
    """Refuse lone surrogates in keys and strings (they cannot be encoded, logged or echoed) and nesting
    past MAX_JSON_DEPTH (an already decoded body never went through ``decode_body``'s check).

    Row values are left to the row model, whose message names the column (prompt, negative_prompt).
    """
    if depth > MAX_JSON_DEPTH:
        raise InvalidRequest(f"{path or 'body'}: nests deeper than {MAX_JSON_DEPTH} levels.")
    if isinstance(value, str) and strings:
        bad = unencodable_at(value)
        if bad is not None:
            raise InvalidRequest(
                f"{path or 'body'}: holds a lone UTF-16 surrogate at character {bad}, which is not text."
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if strings and unencodable_at(str(key)) is not None:
                raise InvalidRequest(f"{path or 'body'}: a key holds a lone UTF-16 surrogate, which is not text.")
            _check_strings(item, where, depth + 1, strings=strings and where != "input_data.data")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_strings(item, f"{path}[{i}]", depth + 1, strings=strings)


def _resolve(request: ScoreRequest, limits: Limits) -> ScoringRequest:
    data = request.input_data
    if request.parameters is not None and data.parameters is not None:
        raise InvalidRequest('"parameters" given both at the top level and inside "input_data"; send one of them.')
    params = request.parameters or data.parameters or Parameters.model_validate({})
    where = "parameters" if request.parameters is not None else "input_data.parameters"

    columns = _check_columns(data.columns)
    if not data.data:
        raise InvalidRequest("input_data.data: must hold at least one row.")
    if data.index is not None and len(data.index) != len(data.data):
        raise InvalidRequest(
            f"input_data.index has {len(data.index)} entries but input_data.data has {len(data.data)} rows; "
            "they must match."
        )
    rows = [_row(i, item, columns, limits) for i, item in enumerate(data.data)]
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
    strength = 1.0
    if task == "text-to-image":
        if params.strength is not None:
            raise InvalidRequest(
                f"{where}.strength: applies only to image-to-image and inpainting (rows with an 'image'); "
                "leave it out for text-to-image."
            )
    else:
        strength = DEFAULT_STRENGTH if params.strength is None else params.strength
        if min(int(steps * strength), steps) < 1:
            raise InvalidRequest(
                f"{where}.strength: {strength} x num_inference_steps {steps} leaves no denoising step; "
                "raise strength or num_inference_steps."
            )
    total = len(rows) * params.num_images_per_prompt
    if total > limits.max_images:
        raise InvalidRequest(
            f"The request asks for {total} images ({len(rows)} rows x num_images_per_prompt "
            f"{params.num_images_per_prompt}); the limit is {limits.max_images} "
            "(SD_ENDPOINT_MAX_IMAGES_PER_REQUEST)."
        )

    negatives = []
    for pos, row in enumerate(rows):
        negative = row.negative_prompt if row.negative_prompt is not None else params.negative_prompt
        if negative and guidance <= 1.0:
            raise InvalidRequest(
                f"input_data.data[{pos}]: a negative_prompt has no effect when guidance_scale <= 1 "
                f"(got {guidance}); raise guidance_scale or leave the negative prompt out."
            )
        negatives.append(negative or None)

    # Images last: decoding is the expensive check.
    inputs: list[tuple[Image.Image | None, Image.Image | None]] = [(None, None)] * len(rows)
    if task == "text-to-image":
        height = params.height or limits.default_height
        width = params.width or limits.default_width
    else:
        inputs = [_row_images(pos, row, limits) for pos, row in enumerate(rows)]
        width, height = _image_output_size(inputs, params, limits)
    if height * width > limits.max_pixels:
        raise InvalidRequest(
            f"{where}.height x width: {height}x{width} = {height * width} pixels is over the limit of "
            f"{limits.max_pixels} (SD_ENDPOINT_MAX_PIXELS)."
        )

    resolved = []
    for pos, row in enumerate(rows):
        base = row.seed if row.seed is not None else params.seed
        if base is None:
            base = secrets.randbelow(2**31)
        seeds = tuple((base + k) % (MAX_SEED + 1) for k in range(params.num_images_per_prompt))
        index: int | str = data.index[pos] if data.index is not None else pos
        image, mask = inputs[pos]
        if image is not None:
            image = images_in.resized(image, width, height)
        if mask is not None:
            mask = images_in.resized(mask, width, height)
        resolved.append(RowRequest(pos, index, row.prompt, negatives[pos], seeds, image, mask))

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
    return ScoringRequest(spec, params.output_format, tuple(resolved))


def _task_of(rows: list[Row]) -> TaskName:
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


def _image_output_size(
    inputs: list[tuple[Image.Image | None, Image.Image | None]], params: Parameters, limits: Limits
) -> tuple[int, int]:
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


def _check_columns(columns: list[str] | None) -> list[str] | None:
    if columns is None:
        return None
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise InvalidRequest(f"input_data.columns: unknown column(s) {_names(unknown)}; allowed: {', '.join(COLUMNS)}.")
    if len(set(columns)) != len(columns):
        raise InvalidRequest("input_data.columns: a column is listed twice.")
    if "prompt" not in columns:
        raise InvalidRequest("input_data.columns: must include 'prompt'.")
    return columns


def _row(pos: int, item: Any, columns: list[str] | None, limits: Limits) -> Row:
    where = f"input_data.data[{pos}]"
    if isinstance(item, str):
        if columns is not None and columns != ["prompt"]:
            raise InvalidRequest(
                f"{where}: a bare string row needs columns ['prompt']; with columns {columns} send a list "
                'or an object per row, e.g. {"prompt": "...", "negative_prompt": "..."}.'
            )
        fields: dict[str, Any] = {"prompt": item}
    elif isinstance(item, dict):
        unknown = [k for k in item if k not in COLUMNS]
        if unknown:
            raise InvalidRequest(f"{where}: unknown key(s) {_names(unknown)}; allowed: {', '.join(COLUMNS)}.")
        if columns is not None:
            missing = [k for k in item if k not in columns]
            if missing:
                raise InvalidRequest(f"{where}: key(s) {missing} are not listed in input_data.columns {columns}.")
        fields = dict(item)
    else:  # a list, matched against columns
        if columns is None:
            raise InvalidRequest(f"{where}: a list row needs input_data.columns to name its values.")
        if len(item) != len(columns):
            raise InvalidRequest(
                f"{where}: has {len(item)} values but input_data.columns has {len(columns)} ({columns})."
            )
        fields = dict(zip(columns, item, strict=True))
    if "prompt" not in fields:
        raise InvalidRequest(f"{where}: missing 'prompt'.")
    try:
        return Row.model_validate(fields, context={"limits": limits})
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc, prefix=where)) from None


_ALLOWED_BY_PARENT = {
    "": sorted(ScoreRequest.model_fields),
    "input_data": sorted(InputData.model_fields),
    "parameters": sorted(Parameters.model_fields),
}


def _describe(exc: ValidationError, prefix: str = "") -> str:
    """Turn pydantic errors into one message that names each field and what it accepts.

    Built from the errors' structured data: ``loc`` (field names and list positions) and ``type``.
    """
    parts: list[str] = []
    for err in exc.errors():
        loc = err["loc"]
        path = prefix
        for part in loc:
            path = f"{path}[{part}]" if isinstance(part, int) else (f"{path}.{part}" if path else str(part))
        if err["type"] == "extra_forbidden":
            parent = str(loc[-2]) if len(loc) >= 2 else ""
            allowed = _ALLOWED_BY_PARENT.get(parent, list(COLUMNS))
            msg = f"unknown field {_clipped(str(loc[-1]))!r}; allowed: {', '.join(allowed)}"
            path = path.rsplit(".", 1)[0] if "." in path else "body"
        elif err["type"] == "missing":
            msg = "is required"
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            if "(got " not in msg:
                msg += _shown(err.get("input"))
        line = f"{path}: {msg}"
        if line not in parts:
            parts.append(line)
    return "Invalid request: " + "; ".join(parts[:10]) + "."


def _clipped(name: str, limit: int = 64) -> str:
    """A client-chosen name, cut short enough to echo in a message and a log line."""
    return name if len(name) <= limit else f"{name[:limit]}... ({len(name)} characters)"


def _names(names: list[str]) -> str:
    return ", ".join(repr(_clipped(n)) for n in names[:5]) + (", ..." if len(names) > 5 else "")


def _shown(got: Any) -> str:
    if isinstance(got, bool) or got is None:
        return f" (got {json.dumps(got)})"
    if isinstance(got, (int, float)):
        return f" (got {got!r})"
    if isinstance(got, str):
        return " (got a JSON string)"
    return f" (got a JSON {_json_type(got)})"


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null"
    )
