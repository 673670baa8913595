"""Where the screener sends its calls and with which credential, decided once at start-up.

The order of credentials (the first that applies):

1. ``CONTENT_SAFETY_KEY`` set: the key (``Ocp-Apim-Subscription-Key``).
2. A credential passed in by the caller (tests, embedding applications).
3. ``UAI_CLIENT_ID`` set: that user-assigned managed identity (Entra ID token).
4. Otherwise ``DefaultAzureCredential`` (system-assigned identity, workload identity, environment, CLI).

For 2-4 one token is requested at start-up (``check_token``), so "no credential available" stops the
process with a message naming the variables instead of failing every request later. Every problem is a
``ConfigError`` naming the variable.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from azure.core.credentials import AzureKeyCredential

from sd_endpoint.errors import ConfigError
from sd_endpoint.net import is_loopback_url
from sd_endpoint.settings import ContentSafetySettings

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

log = logging.getLogger(__name__)

TOKEN_SCOPE = "https://cognitiveservices.azure.com/.default"


def normalize_endpoint(value: str) -> str:
    """The endpoint without trailing slashes; ValueError when it is not an http(s) base URL."""
    url = value.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a malformed port
    except ValueError:
        raise ValueError("is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL such as https://<resource>.cognitiveservices.azure.com")
    if parts.username or parts.password:
        raise ValueError("must not contain a user name or password")
    if parts.query or parts.fragment:
        raise ValueError("must not contain a query string or fragment")
    if port == 0:
        raise ValueError("has port 0")
    return url


def endpoint_setting(value: str) -> str:
    """normalize_endpoint, with a ConfigError naming the variable (and not echoing embedded credentials)."""
    try:
        return normalize_endpoint(value)
    except ValueError as exc:
        shown = "" if "@" in value else f" (got {value!r})"
        raise ConfigError(f"CONTENT_SAFETY_ENDPOINT: {exc}{shown}") from None


def resolve_credential(
    settings: ContentSafetySettings, credential: TokenCredential | None = None
) -> tuple[AzureKeyCredential | TokenCredential, str, bool]:
    """(credential, description for logs, whether we own it and must close it), per the module rule."""
    key = settings.key.get_secret_value().strip() if settings.key is not None else ""
    if key:
        return AzureKeyCredential(key), "key (CONTENT_SAFETY_KEY)", False
    if credential is not None:
        return credential, f"token credential ({type(credential).__name__})", False
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if settings.uai_client_id:
        cred: TokenCredential = ManagedIdentityCredential(client_id=settings.uai_client_id)
        return cred, f"user-assigned managed identity (UAI_CLIENT_ID={settings.uai_client_id})", True
    return DefaultAzureCredential(), "DefaultAzureCredential (no CONTENT_SAFETY_KEY or UAI_CLIENT_ID)", True


def call_options(endpoint: str, uses_key: bool) -> dict[str, Any]:
    """The SDK call options for this endpoint; ConfigError where a token would leave the machine unencrypted.

    Bearer tokens go only over TLS, except to this machine (the emulator); a key is the deployer's choice,
    but plain http off this machine is worth a warning.
    """
    options: dict[str, Any] = {}
    if endpoint.startswith("http://"):
        if not is_loopback_url(endpoint):
            if not uses_key:
                raise ConfigError(
                    "CONTENT_SAFETY_ENDPOINT: Entra ID tokens are only sent over https (got an http:// URL "
                    "that is not on this machine); use https, or CONTENT_SAFETY_KEY."
                )
            log.warning("CONTENT_SAFETY_ENDPOINT is plain http: the key travels unencrypted")
        elif not uses_key:
            options["enforce_https"] = False
    return options


def check_token(credential: TokenCredential, description: str, timeout_s: float) -> None:
    """Get one token now, so that a missing identity is a start-up error; ConfigError otherwise."""
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            credential.get_token(TOKEN_SCOPE)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below, whatever it is
            outcome.append(exc)

    thread = threading.Thread(target=probe, name="aacs-token-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if outcome and outcome[0] is None:
        return
    reason = f"no token within {timeout_s:.0f} s" if not outcome else first_line(outcome[0])
    raise ConfigError(
        "CONTENT_SAFETY_ENDPOINT is set but no credential is available: CONTENT_SAFETY_KEY is not set and "
        f"{description} could not get a token for {TOKEN_SCOPE} ({reason}). Set CONTENT_SAFETY_KEY, or "
        "UAI_CLIENT_ID to a user-assigned identity with the 'Cognitive Services User' role on the resource."
    )


def first_line(exc: BaseException | None, limit: int = 300) -> str:
    """The exception's type and the first line of its message, shortened to ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if exc is not None else "unknown error"
    return text if len(text) <= limit else text[: limit - 3] + "..."
