"""One error hierarchy for every envelope (score.py, the HTTP server, the batch script).

Each class carries its HTTP status; envelopes render ``{"message": ...}`` with that status::

    EndpointError (500)
    ├── InvalidRequest (400)          bad JSON, wrong types, out-of-range values, unknown fields
    ├── PayloadTooLarge (413)         body over SD_ENDPOINT_MAX_BODY_BYTES
    ├── UnsupportedMediaType (415)
    ├── Unauthorized (401)
    ├── RequestHeaderTooLarge (431)
    ├── RequestTimeout (408)          SD_ENDPOINT_REQUEST_TIMEOUT_MS passed; generation stopped
    ├── Overloaded (429)              too many requests in flight or queued; carries Retry-After
    ├── ServiceUnavailable (503)      model not ready, content screening unreachable (fail closed)
    ├── GenerationCancelled (499)     the client went away; nobody reads the answer
    └── GenerationFailed (500)

Start-up problems are not HTTP errors: ``ConfigError`` (names the environment variable) and
``ModelLoadError`` (names the path and what was expected) stop the process before it serves.
"""

from __future__ import annotations


class EndpointError(Exception):
    """Base class of every error a request can end with."""

    status_code: int = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, str]:
        # A message that quotes client text must still encode: a lone surrogate becomes a \uXXXX escape.
        return {"message": self.message.encode("utf-8", "backslashreplace").decode("utf-8")}


class InvalidRequest(EndpointError):
    status_code = 400


class PayloadTooLarge(EndpointError):
    # Not an InvalidRequest: code that handles a bad field (``except InvalidRequest``) must not take a 413.
    status_code = 413


class UnsupportedMediaType(EndpointError):
    status_code = 415


class Unauthorized(EndpointError):
    status_code = 401

    def __init__(self, message: str = "Missing or invalid key: send 'Authorization: Bearer <key>'.") -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="sd-endpoint"'})


class RequestHeaderTooLarge(EndpointError):
    status_code = 431


class RequestTimeout(EndpointError):
    status_code = 408


class Overloaded(EndpointError):
    status_code = 429

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after_s))})


class ServiceUnavailable(EndpointError):
    """Always carries Retry-After (the OpenAPI document promises it on every 503)."""

    status_code = 503

    def __init__(self, message: str, *, retry_after_s: int = 5, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after_s)), **(headers or {})})


class GenerationCancelled(EndpointError):
    # 499 is nginx's "client closed request": the status is only ever logged, never read by anyone.
    status_code = 499


class GenerationFailed(EndpointError):
    status_code = 500


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the environment variable."""


class ModelLoadError(Exception):
    """The model could not be found or loaded; the message names the path and what was expected."""


class ScreeningUnavailable(ServiceUnavailable):
    """Content screening is configured but could not answer; nothing unscreened is returned."""
