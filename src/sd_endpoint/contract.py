"""The scoring contract: the pydantic models of every request form Azure clients send, and of the response.

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
is resized. Images are decoded and checked before the service sees them (``images_in``), so the backend
gets ready PIL images.

The response is a JSON array with one ``ImageRecord`` per generated image, in input order.
Unknown keys are errors that list the allowed ones: Azure ignores them silently, and a typo such as
``guidence_scale`` would otherwise quietly use the default.

A body becomes a ``ScoringRequest`` (the parsed form at the end of this module) in two steps:
``request_parsing`` (JSON, the row forms, the 400 messages) and ``request_resolution`` (defaults, rules
that span fields, images, seeds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
)

from sd_endpoint import images_in
from sd_endpoint.jobs import (
    MAX_CACHE_INTERVAL,
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
