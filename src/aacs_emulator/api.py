"""The service's side of the two analyze calls, apart from HTTP: authentication, the API version, request
validation with the service's error codes and limits, and the answers a ``Policy`` gives.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from aacs_emulator.limits import (
    API_VERSION,
    CATEGORIES,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_SIDE,
    MAX_TEXT_CHARS,
    MIN_IMAGE_SIDE,
    OUTPUT_TYPES,
)
from aacs_emulator.policy import Policy, image_fingerprint

# The service's answer to a wrong key (also what the "401" fault sends).
INVALID_KEY = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key "
    "for an active subscription and use a correct regional API endpoint for your resource."
)


class ApiError(Exception):
    """An answer the service gives as an error: status, ``x-ms-error-code`` and message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


@dataclass
class RecordedRequest:
    """One analyze call as the emulator saw it (no key; text kept for assertions in tests)."""

    kind: str  # "text" or "image"
    status: int  # 0: dropped by a "down" fault
    auth: str  # the credential it carried, valid or not: "key", "bearer" or "none"
    text: str | None = None
    blocklist_names: list[str] = field(default_factory=list)
    output_type: str | None = None
    image_sha256: str | None = None
    image_size: tuple[int, int] | None = None  # (width, height)
    image_bytes: int | None = None
    image_format: str | None = None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "status": self.status, "auth": self.auth}
        if self.text is not None:
            out["text_length"] = len(self.text)
            out["blocklist_names"] = self.blocklist_names
            out["output_type"] = self.output_type
        if self.image_sha256 is not None:
            out.update(
                image_sha256=self.image_sha256,
                image_size=list(self.image_size or ()),
                image_bytes=self.image_bytes,
                image_format=self.image_format,
            )
        return out


def check_auth(headers: Mapping[str, str], key: str | None, token: str | None) -> None:
    """Raise a 401 ApiError unless the request carries the configured key or token (if any)."""
    sent_key = headers.get("Ocp-Apim-Subscription-Key")
    bearer = headers.get("Authorization", "")
    sent_token = bearer[7:].strip() if bearer[:7].lower() == "bearer " else None
    if key is None and token is None:
        return
    if sent_key is not None and key is not None and _same(sent_key, key):
        return
    if sent_token is not None and token is not None and _same(sent_token, token):
        return
    if sent_key is None and sent_token is None:
        raise ApiError(
            401,
            "401",
            "Access denied due to missing subscription key. Make sure to include subscription key when making "
            "requests to an API.",
        )
    raise ApiError(401, "401", INVALID_KEY)


def check_api_version(query: str) -> None:
    """Raise a 400 ApiError unless the query string names the one API version the emulator speaks."""
    versions = parse_qs(query).get("api-version")
    if not versions:
        raise ApiError(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        )
    if versions[0] != API_VERSION:
        raise ApiError(
            400,
            "UnsupportedApiVersion",
            f"The HTTP resource does not support the API version '{versions[0]}'; use {API_VERSION}.",
        )


def analyze_text(policy: Policy, body: Any, record: RecordedRequest) -> dict[str, Any]:
    """The text:analyze answer for ``body`` under ``policy``; fills ``record`` with what was asked."""
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    text = body.get("text")
    if not isinstance(text, str) or not text:
        raise invalid("The 'text' field is required and must be a non-empty string.")
    record.text = text
    categories = _requested_categories(body.get("categories"))
    names = body.get("blocklistNames") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise invalid("'blocklistNames' must be a list of strings.")
    record.blocklist_names = list(names)
    halt = body.get("haltOnBlocklistHit", False)
    if not isinstance(halt, bool):
        raise invalid("'haltOnBlocklistHit' must be a boolean.")
    output_type = body.get("outputType", "FourSeverityLevels")
    if output_type not in OUTPUT_TYPES:
        raise invalid(f"'outputType' must be one of {', '.join(OUTPUT_TYPES)}.")
    record.output_type = output_type
    if len(text) > MAX_TEXT_CHARS:
        raise invalid(f"The text is too long: {len(text)} characters; the maximum is {MAX_TEXT_CHARS}.")
    for name in names:
        if name not in policy.blocklists:
            raise ApiError(404, "ResourceNotFound", f"The blocklist '{name}' does not exist.")
    severities = policy.text_severities(text)
    matches = policy.blocklist_matches(text, list(names))
    return {
        "blocklistsMatch": [
            {"blocklistName": m.blocklist, "blocklistItemId": m.item_id, "blocklistItemText": m.text} for m in matches
        ],
        "categoriesAnalysis": _analysis(severities, categories, eight=output_type == "EightSeverityLevels"),
    }


def analyze_image(policy: Policy, body: Any, record: RecordedRequest) -> dict[str, Any]:
    """The image:analyze answer for ``body`` under ``policy``; fills ``record`` with what was asked."""
    if not isinstance(body, dict) or not isinstance(body.get("image"), dict):
        raise invalid("The 'image' field is required and must be an object.")
    image = body["image"]
    if ("content" in image) == ("blobUrl" in image):
        raise invalid("Exactly one of 'image.content' and 'image.blobUrl' must be provided.")
    if "blobUrl" in image:
        raise invalid("'image.blobUrl' is not supported by the emulator; send 'image.content'.")
    categories = _requested_categories(body.get("categories"))
    if body.get("outputType", "FourSeverityLevels") != "FourSeverityLevels":
        raise invalid("'outputType' must be FourSeverityLevels for images.")
    content = image["content"]
    try:
        if not isinstance(content, str):
            raise ValueError
        data = base64.b64decode(content, validate=True)
    except (ValueError, binascii.Error):
        raise invalid("'image.content' must be base64-encoded image bytes.") from None
    record.image_bytes = len(data)
    record.image_sha256 = hashlib.sha256(data).hexdigest()
    if len(data) > MAX_IMAGE_BYTES:
        raise invalid(f"The image size is too large: {len(data)} bytes; the maximum is 4 MB.")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            record.image_size, record.image_format = im.size, im.format
    except (UnidentifiedImageError, OSError):
        raise invalid("The image format is not supported.") from None
    width, height = record.image_size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise invalid("The image size is too small.")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise invalid(f"The image dimensions are too large: {width}x{height}; the maximum is 2048x2048.")
    digest, mean = image_fingerprint(data)
    return {"categoriesAnalysis": _analysis(policy.image_severities(digest, mean), categories, eight=False)}


def sent_auth(headers: Mapping[str, str]) -> str:
    """Which kind of credential a request carried (valid or not): 'key', 'bearer' or 'none'."""
    if headers.get("Ocp-Apim-Subscription-Key") is not None:
        return "key"
    return "bearer" if headers.get("Authorization", "")[:7].lower() == "bearer " else "none"


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


def invalid(message: str) -> ApiError:
    return ApiError(400, "InvalidRequestBody", message)


def _requested_categories(value: Any) -> list[str]:
    if value is None:
        return list(CATEGORIES)
    if not isinstance(value, list) or not value:
        raise invalid("'categories' must be a non-empty list.")
    out = []
    for item in value:
        match = [c for c in CATEGORIES if isinstance(item, str) and item.lower() == c.lower()]
        if not match:
            raise invalid(f"'categories' items must be among {', '.join(CATEGORIES)}.")
        out.append(match[0])
    return out


def _analysis(severities: Mapping[str, int], categories: list[str], *, eight: bool) -> list[dict[str, Any]]:
    return [
        {"category": c, "severity": severities[c] if eight else severities[c] - severities[c] % 2} for c in categories
    ]
