"""Configuration from the environment (pydantic-settings).

Every setting of ours is ``SD_ENDPOINT_<NAME>``; Azure's own variables keep their names
(``AZUREML_MODEL_DIR``, ``CONTENT_SAFETY_*``). Errors name the variable, never the Python field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sd_endpoint.errors import ConfigError

ENV_PREFIX = "SD_ENDPOINT_"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """The endpoint's settings. The README's table lists each variable with its default."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True)

    # --- model -------------------------------------------------------------------------------
    model: str | None = Field(
        default=None,
        description="A diffusers folder, a .safetensors/.ckpt checkpoint, a Hub id, or 'demo'.",
    )
    azureml_model_dir: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("AZUREML_MODEL_DIR"),
        description="Set by Azure ML: the folder the registered model is mounted in.",
    )
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="'auto': fp16 on CUDA, bf16 on CPUs with native bf16, else fp32."
    )
    backend: Literal["auto", "diffusers", "deepspeed"] = Field(
        default="auto", description="'auto': DeepSpeed kernels when CUDA+DeepSpeed pass a self-check, else diffusers."
    )
    compile: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="torch.compile the UNet for the warm shapes: 'auto' on CUDA, not on CPU; 'on'/'off'.",
    )
    compile_cache: Path | None = Field(
        default=None,
        description="Persistent torch.compile cache (default SD_ENDPOINT_CACHE_DIR/compile); rebuilt if another "
        "GPU, torch or model filled it.",
    )
    precision: Literal["fp16", "fp8"] = Field(
        default="fp16",
        description="'fp8': the UNet's linear layers in fp8 (torchao, per-row scales); needs a CUDA GPU with fp8 "
        "tensor cores (compute capability 8.9+). 'fp16': the model dtype (SD_ENDPOINT_DTYPE).",
    )
    warmup: bool = Field(default=True, description="Run one small generation before reporting ready.")
    warm_shapes: Annotated[list[tuple[int, int, int]], NoDecode] = Field(
        default_factory=lambda: [(768, 768, 1)],
        description="HEIGHTxWIDTH[xBATCH],...: the shapes captured (DeepSpeed CUDA graphs) or compiled "
        "(SD_ENDPOINT_COMPILE) at start-up; other shapes run on the plain eager path.",
    )
    cuda_graphs: bool = Field(
        default=True, description="On CUDA, replay the UNet of each warm shape as a CUDA graph (diffusers path)."
    )
    cache_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd-endpoint",
        description="Where the demo model and generated tokenizer files are built once.",
    )

    # --- request limits ----------------------------------------------------------------------
    max_images_per_request: int = Field(default=8, ge=1, le=64, description="Rows x num_images_per_prompt cap.")
    max_pixels: int = Field(default=1024 * 1024, ge=64 * 64, description="Cap on height*width.")
    max_steps: int = Field(default=150, ge=1, le=1000, description="Upper bound of num_inference_steps.")
    max_prompt_chars: int = Field(default=20_000, ge=1, description="Longest prompt or negative prompt accepted.")
    max_body_bytes: int = Field(
        default=20_000_000, ge=1024, description="Larger request bodies get 413 (room for base64 input images)."
    )
    max_image_bytes: int = Field(
        default=10_000_000, ge=1024, description="Largest input image (image-to-image, inpainting), decoded bytes."
    )
    max_input_pixels: int = Field(
        default=4096 * 4096,
        ge=64 * 64,
        description="Largest input image in pixels, read from its header before decoding (decompression bombs).",
    )
    default_height: int | None = Field(default=None, description="Default: the model's native size.")
    default_width: int | None = Field(default=None, description="Default: the model's native size.")
    default_steps: int = Field(default=50, ge=1, description="num_inference_steps when a request gives none.")
    default_guidance_scale: float = Field(default=7.5, description="guidance_scale when a request gives none.")

    # --- serving -----------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Address `sd-endpoint serve` binds (0.0.0.0 in containers).")
    port: int = Field(default=5001, ge=1, le=65535, description="Port of `sd-endpoint serve` (Azure's 5001).")
    keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Comma-separated API keys (primary,secondary)."
    )
    max_concurrent_requests: int = Field(
        default=2, ge=1, description="Requests generating at once; match max_concurrent_requests_per_instance."
    )
    max_queue_wait_ms: int = Field(default=500, ge=0, description="Longest wait for a slot before 429.")
    max_queued_requests: int | None = Field(
        default=None,
        ge=0,
        description="Requests that may wait for a slot; default SD_ENDPOINT_MAX_CONCURRENT_REQUESTS (Azure's 2x).",
    )
    request_timeout_ms: int = Field(
        default=85_000, ge=100, description="Below the deployment's request_timeout_ms (90000)."
    )
    max_batch_size: int = Field(default=4, ge=1, description="Images per micro-batched pipeline call (1: off).")
    batch_wait_ms: int = Field(default=10, ge=0, description="How long a batch waits for batch-mates.")
    shutdown_grace_s: float = Field(default=30.0, ge=0, description="On SIGTERM, time to finish in-flight requests.")
    body_read_timeout_s: float = Field(
        default=5.0, gt=0, description="Longest wait for each chunk of a request body before 408 (slow clients)."
    )
    max_connections: int = Field(
        default=200, ge=1, description="Open connections served at once; past it, a JSON 503 with Retry-After."
    )
    openai_image_base_url: str | None = Field(
        default=None,
        description="This server's public URL (e.g. https://host:5001). Set, /v1/images/* answer "
        'response_format "url" with links kept for SD_ENDPOINT_OPENAI_IMAGE_TTL_S; unset, "url" is a 400.',
    )
    openai_image_ttl_s: int = Field(
        default=600, ge=1, le=86_400, description="How long an image answered by URL stays downloadable."
    )
    openai_image_store_bytes: int = Field(
        default=256_000_000, ge=16_000_000, description="Memory for images kept for URLs; the oldest go first."
    )
    log_prompts: bool = Field(default=False, description="Log prompt text (off: prompts never reach the logs).")
    log_format: Literal["text", "json"] = Field(default="text", description="'json': one JSON object per line.")
    log_level: str = Field(default="INFO", description="Python logging level.")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_switch(cls, value: Any) -> Any:
        words = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}
        if isinstance(value, bool):
            return "on" if value else "off"
        return words.get(str(value).strip().lower(), str(value).strip().lower())

    @field_validator("keys", mode="before")
    @classmethod
    def _keys_csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("warm_shapes", mode="before")
    @classmethod
    def _warm_shapes_csv(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        shapes = []
        for part in _split_csv(value):
            dims = part.lower().split("x")
            if len(dims) not in (2, 3) or not all(d.strip().isdigit() for d in dims):
                raise ValueError(f"{part!r} is not HEIGHTxWIDTH or HEIGHTxWIDTHxBATCH (e.g. 768x768x2)")
            h, w, b = (int(d) for d in (dims if len(dims) == 3 else [*dims, "1"]))
            if h % 8 or w % 8 or h < 64 or w < 64 or b < 1:
                raise ValueError(f"{part!r}: height and width must be multiples of 8 and at least 64, batch >= 1")
            shapes.append((h, w, b))
        return shapes

    @field_validator("openai_image_base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")) or "?" in value or "#" in value:
            raise ValueError("must be an http:// or https:// URL without query or fragment, e.g. https://host:5001")
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        v = value.strip().lower()
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")

    @field_validator("default_height", "default_width")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and (value % 8 or value < 64):
            raise ValueError("must be a multiple of 8 and at least 64")
        return value


_BLOCKLIST_NAME = re.compile(r"^[0-9A-Za-z._~-]{1,64}$")


class ContentSafetySettings(BaseSettings):
    """Azure AI Content Safety, under Azure's own variable names (``CONTENT_SAFETY_*``)."""

    model_config = SettingsConfigDict(env_prefix="CONTENT_SAFETY_", extra="ignore", populate_by_name=True)

    endpoint: str | None = Field(
        default=None, description="Azure AI Content Safety endpoint; setting it turns screening on."
    )
    key: SecretStr | None = Field(default=None, description="Resource key; without it, Entra ID via managed identity.")
    # Thresholds run from 1 (0 would block everything) to 7 (the top of the eight-level scale).
    threshold: int = Field(
        default=2, ge=1, le=7, description="A category blocks at severity >= threshold (0/2/4/6 scale)."
    )
    fail_open: bool = Field(default=False, description="Answer unscreened (nsfw null) when screening fails; else 503.")
    uai_client_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("UAI_CLIENT_ID"),
        description="Client id of a user-assigned managed identity for the token.",
    )
    # Per-category overrides of `threshold`.
    threshold_hate: int | None = Field(
        default=None, ge=1, le=7, description="Per-category override of CONTENT_SAFETY_THRESHOLD."
    )
    threshold_self_harm: int | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "CONTENT_SAFETY_THRESHOLD_SELF_HARM", "CONTENT_SAFETY_THRESHOLD_SELFHARM", "threshold_self_harm"
        ),
        ge=1,
        le=7,
        description="Per-category override of CONTENT_SAFETY_THRESHOLD (also ..._SELFHARM).",
    )
    threshold_sexual: int | None = Field(
        default=None, ge=1, le=7, description="Per-category override of CONTENT_SAFETY_THRESHOLD."
    )
    threshold_violence: int | None = Field(
        default=None, ge=1, le=7, description="Per-category override of CONTENT_SAFETY_THRESHOLD."
    )
    blocklists: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated blocklist names passed to every text call."
    )
    output_type: Literal["FourSeverityLevels", "EightSeverityLevels"] = Field(
        default="FourSeverityLevels", description="Text severity scale (images are always four-level)."
    )
    timeout_s: float = Field(default=10.0, gt=0, le=300, description="Connect and read timeout of one call.")
    retries: int = Field(default=2, ge=0, le=10, description="Retries of a failed call (429, 5xx, network).")
    max_concurrency: int = Field(default=16, ge=1, le=256, description="Calls in flight, over all requests.")
    log_prompts: bool = Field(default=False, validation_alias=AliasChoices("SD_ENDPOINT_LOG_PROMPTS", "log_prompts"))

    @field_validator("blocklists", mode="before")
    @classmethod
    def _blocklists_csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("blocklists")
    @classmethod
    def _blocklist_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _BLOCKLIST_NAME.match(name):
                raise ValueError(f"{name!r} is not a blocklist name (1-64 of A-Z a-z 0-9 . _ ~ -)")
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)

    def thresholds(self) -> dict[str, int]:
        """The threshold of each category, overrides applied."""
        overrides = {
            "Hate": self.threshold_hate,
            "SelfHarm": self.threshold_self_harm,
            "Sexual": self.threshold_sexual,
            "Violence": self.threshold_violence,
        }
        return {name: self.threshold if value is None else value for name, value in overrides.items()}


_S = TypeVar("_S", bound=BaseSettings)


def env_name(settings_cls: type[BaseSettings], field: str) -> str:
    """The environment variable that sets ``field`` of ``settings_cls``."""
    info = settings_cls.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, AliasChoices):
        first = info.validation_alias.choices[0]
        if isinstance(first, str):
            return first
    prefix = settings_cls.model_config.get("env_prefix", "")
    return f"{prefix}{field}".upper()


def load(settings_cls: type[_S], **overrides: Any) -> _S:
    """Build settings from the environment; a bad value raises ConfigError naming the variable."""
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            where = env_name(settings_cls, field) if field in settings_cls.model_fields else field or "settings"
            got = err.get("input")
            shown = "" if isinstance(got, dict) or field == "keys" else f" (got {got!r})"
            problems.append(f"{where}: {err['msg']}{shown}")
        raise ConfigError("Invalid configuration: " + "; ".join(problems)) from None


def load_settings(**overrides: Any) -> Settings:
    return load(Settings, **overrides)
