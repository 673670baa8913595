"""What the contract's routes document about themselves in the API description: each error status with its
``{"message"}`` body, ``Retry-After``, and the examples of ``POST /score``. Data only; the routes use it."""

from __future__ import annotations

from typing import Any

from sd_endpoint.contract import ErrorBody, ImageRecord, ScoreRequest


def error_response(description: str, **extra: Any) -> dict[str, Any]:
    """One documented error status: the contract's error body, and why the status is answered."""
    return {"model": ErrorBody, "description": description, **extra}


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
_RECORD_EXAMPLE = [
    {
        "prompt": "an astronaut riding a horse",
        "generated_image": "iVBORw0KGgoAAAANSUhEUgAA...",
        "nsfw_content_detected": None,
        "seed": 42,
        "index": 0,
    }
]
SCORE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": list[ImageRecord],
        "description": "One record per generated image, in input order.",
        "content": {"application/json": {"example": _RECORD_EXAMPLE}},
    },
    400: error_response("Malformed JSON, or an invalid request: the message names the field and what it accepts."),
    401: error_response(
        "Missing or wrong key (only when SD_ENDPOINT_KEYS is set).",
        headers={"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    ),
    408: error_response("SD_ENDPOINT_REQUEST_TIMEOUT_MS passed; the generation stopped at its next denoising step."),
    413: error_response("The body is larger than SD_ENDPOINT_MAX_BODY_BYTES."),
    415: error_response("Content-Type is not application/json."),
    429: error_response(
        "Too many requests in flight and queued; retry after Retry-After seconds.", headers=RETRY_AFTER
    ),
    431: error_response("An id header (x-request-id, x-ms-request-id, x-ms-client-request-id) is over 100 characters."),
    500: error_response("Generation failed; the message gives the request id to look up in the server log."),
    503: error_response(
        "The model is still loading or warming up, the server is shutting down, or content screening is unreachable.",
        headers=RETRY_AFTER,
    ),
}
_REQUEST_EXAMPLES = {
    f"example{i + 1}": {"value": example}
    for i, example in enumerate(ScoreRequest.model_json_schema().get("examples", []))
}
SCORE_OPENAPI_EXTRA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The scoring request (pandas split orientation), as Azure ML clients send it.",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}, "examples": _REQUEST_EXAMPLES}
        },
    },
    "security": [{"Bearer": []}],
}
