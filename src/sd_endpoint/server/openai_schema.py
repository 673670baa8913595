"""OpenAI's images API on the wire: the request models (OpenAI's fields plus ours), their validation into a
400 that names the field, and OpenAI's error body, ``{"error": {"message", "type", "param", "code"}}``, so that
OpenAI SDKs raise their own exception types with our message."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sd_endpoint.contract import OutputFormat
from sd_endpoint.errors import EndpointError, InvalidRequest
from sd_endpoint.jobs import SchedulerName

# OpenAI's error "type" for each status we answer with.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
}
_ERROR_CODES = {401: "invalid_api_key", 413: "request_too_large", 429: "rate_limit_exceeded"}


class OpenAIError(InvalidRequest):
    """A 400 raised by the translation itself, naming the OpenAI field (``param``) and a machine ``code``."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ContentBlocked(OpenAIError):
    """Every image was blocked by content screening: OpenAI answers that with a 400 of this code."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="content_policy_violation")


class GenerationsRequest(BaseModel):
    """``POST /v1/images/generations``: OpenAI's fields, plus ours (negative_prompt, seed, steps, ...)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="What to draw.")
    n: int = Field(1, description="Images to generate (seeds seed, seed+1, ...).")
    size: str | None = Field(None, description='"WIDTHxHEIGHT", multiples of 8 (e.g. "512x512"), or "auto".')
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description='"b64_json" (the default), or "url" when SD_ENDPOINT_OPENAI_IMAGE_BASE_URL is set.'
    )
    output_format: OutputFormat | None = Field(None, description="png (default), jpeg or webp.")
    negative_prompt: str | None = Field(None, description="What to steer away from.")
    seed: int | None = Field(None, description="Seed of the first image; random when absent.")
    steps: int | None = Field(None, description="Denoising steps (num_inference_steps).")
    guidance_scale: float | None = Field(None, description="Classifier-free guidance scale.")
    scheduler: SchedulerName | None = Field(None, description="Sampler; the model's own (DDIM) when absent.")
    # Accepted so that unchanged OpenAI clients work, and ignored: one model is served, at one quality.
    model: str | None = Field(None, description="Ignored: the server has one model.")
    quality: str | None = Field(None, description="Ignored.")
    style: str | None = Field(None, description="Ignored.")
    moderation: str | None = Field(None, description="Ignored (content screening is the server's setting).")
    user: str | None = Field(None, description="Ignored.")


class EditsRequest(GenerationsRequest):
    """``POST /v1/images/edits`` (multipart): the text fields; ``image`` and ``mask`` are file parts."""

    strength: float | None = Field(None, description="How far from the input image, 0..1 (0.8).")


def validate_request(payload: Any, model: type[GenerationsRequest] = GenerationsRequest) -> GenerationsRequest:
    """The decoded body as ``model``, or a 400 naming the first field at fault (OpenAI's ``param``)."""
    if not isinstance(payload, dict):
        raise OpenAIError("The request body must be a JSON object with a 'prompt'.")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(model.model_fields)
            raise OpenAIError(f"Unknown field '{field}'; allowed: {allowed}.", param=field) from None
        if err["type"] == "missing":
            raise OpenAIError(f"{field}: is required.", param=field) from None
        raise OpenAIError(f"{field}: {err['msg']}.", param=field) from None


def error_body(exc: EndpointError) -> dict[str, Any]:
    """OpenAI's error shape for one of our errors; the status code stays the same."""
    status = exc.status_code
    kind = _ERROR_TYPES.get(status, "server_error")
    return {
        "error": {
            "message": exc.body()["message"],  # the hierarchy's rendering (lone surrogates escaped)
            "type": kind,
            "param": getattr(exc, "param", None),
            "code": getattr(exc, "code", None) or _ERROR_CODES.get(status),
        }
    }
