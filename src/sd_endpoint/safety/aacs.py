"""Screening with Azure AI Content Safety (AACS) through the official SDK, ``azure-ai-contentsafety``.

One rule everywhere: a category blocks when its severity is at or above its threshold; a blocklist hit
blocks. Every call of one ``screen_*`` invocation runs concurrently on a shared, bounded thread pool, and
any failure of the service raises ``ScreeningUnavailable`` (the service then fails closed or open).

Authentication, decided once at start-up (``from_settings``):

1. ``CONTENT_SAFETY_KEY`` set: the key (``Ocp-Apim-Subscription-Key``).
2. A credential passed in by the caller (tests, embedding applications).
3. ``UAI_CLIENT_ID`` set: that user-assigned managed identity (Entra ID token).
4. Otherwise ``DefaultAzureCredential`` (system-assigned identity, workload identity, environment, CLI).

For 2-4 one token is requested at start-up, so "no credential available" stops the process with a
message naming the variables instead of failing every request later.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import requests
from azure.ai.contentsafety import ContentSafetyClient
from azure.ai.contentsafety.models import AnalyzeImageOptions, AnalyzeTextOptions, ImageData
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.core.pipeline.policies import HttpLoggingPolicy, RetryPolicy
from azure.core.pipeline.transport import RequestsTransport
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from sd_endpoint import metrics
from sd_endpoint.errors import ConfigError, ScreeningUnavailable
from sd_endpoint.net import is_loopback_url
from sd_endpoint.safety.base import Stage, Verdict
from sd_endpoint.safety.preprocess import CATEGORIES, OUTPUT_TYPES, chunk_text, prepare_image
from sd_endpoint.settings import ContentSafetySettings

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

log = logging.getLogger(__name__)
# azure-core logs every request and response at INFO; ours go to a child logger that is quiet unless
# lowered on purpose (headers are redacted by azure-core either way; bodies are never logged).
_http_log = logging.getLogger(f"{__name__}.http")
_http_log.setLevel(logging.WARNING)

TOKEN_SCOPE = "https://cognitiveservices.azure.com/.default"
_CANONICAL = {name.lower(): name for name in CATEGORIES}
_T = TypeVar("_T")

# What a prompt or image call found: severity per category, and the blocklists that matched.
_Analysis = tuple[dict[str, int], tuple[str, ...]]


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


def _endpoint_setting(value: str) -> str:
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
    reason = f"no token within {timeout_s:.0f} s" if not outcome else _first_line(outcome[0])
    raise ConfigError(
        "CONTENT_SAFETY_ENDPOINT is set but no credential is available: CONTENT_SAFETY_KEY is not set and "
        f"{description} could not get a token for {TOKEN_SCOPE} ({reason}). Set CONTENT_SAFETY_KEY, or "
        "UAI_CLIENT_ID to a user-assigned identity with the 'Cognitive Services User' role on the resource."
    )


def _first_line(exc: BaseException | None, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if exc is not None else "unknown error"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AzureContentSafetyScreener:
    """The AACS screening stage (the ``Screener`` protocol); thread-safe, one per process."""

    enabled = True

    def __init__(
        self,
        endpoint: str,
        credential: AzureKeyCredential | TokenCredential,
        *,
        thresholds: Mapping[str, int] | None = None,
        blocklists: Sequence[str] = (),
        output_type: str = "FourSeverityLevels",
        timeout_s: float = 10.0,
        retries: int = 2,
        max_concurrency: int = 16,
        log_prompts: bool = False,
        owns_credential: bool = False,
        retry_backoff_s: float = 0.5,
        retry_backoff_max_s: float = 4.0,
    ) -> None:
        self.endpoint = _endpoint_setting(endpoint)
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"CONTENT_SAFETY_OUTPUT_TYPE: must be one of {', '.join(OUTPUT_TYPES)}")
        self.thresholds = dict.fromkeys(CATEGORIES, 2)
        for name, value in (thresholds or {}).items():
            canonical = _CANONICAL.get(name.lower().replace("_", ""))
            if canonical is None or not 1 <= int(value) <= 7:
                raise ConfigError(
                    f"CONTENT_SAFETY_THRESHOLD: a threshold is a category of {', '.join(CATEGORIES)} "
                    f"with a value from 1 to 7 (got {name}={value!r})"
                )
            self.thresholds[canonical] = int(value)
        self.blocklists = list(blocklists)
        self.output_type = output_type
        self.timeout_s = timeout_s
        self.retries = retries
        self.log_prompts = log_prompts
        self.uses_key = isinstance(credential, AzureKeyCredential)
        self._credential = credential
        self._owns_credential = owns_credential
        # Bearer tokens go only over TLS, except to this machine (the emulator); a key is the
        # deployer's choice, but plain http off this machine is worth a warning.
        self._call_kwargs: dict[str, Any] = {}
        if self.endpoint.startswith("http://"):
            if not is_loopback_url(self.endpoint):
                if not self.uses_key:
                    raise ConfigError(
                        "CONTENT_SAFETY_ENDPOINT: Entra ID tokens are only sent over https (got an http:// URL "
                        "that is not on this machine); use https, or CONTENT_SAFETY_KEY."
                    )
                log.warning("CONTENT_SAFETY_ENDPOINT is plain http: the key travels unencrypted")
            elif not self.uses_key:
                self._call_kwargs["enforce_https"] = False

        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="aacs")
        self._client = ContentSafetyClient(
            self.endpoint,
            credential,
            transport=RequestsTransport(
                session=_session(max_concurrency), connection_timeout=timeout_s, read_timeout=timeout_s
            ),
            http_logging_policy=HttpLoggingPolicy(logger=_http_log),
            retry_policy=BoundedRetryPolicy(
                retry_total=retries,
                retry_backoff_factor=retry_backoff_s,
                retry_backoff_max=retry_backoff_max_s,
            ),
        )

    @classmethod
    def from_settings(
        cls, settings: ContentSafetySettings, *, credential: TokenCredential | None = None
    ) -> AzureContentSafetyScreener:
        """Build from CONTENT_SAFETY_* (see the module docstring); ConfigError names the variable."""
        if not settings.endpoint:
            raise ConfigError("CONTENT_SAFETY_ENDPOINT: required to build the content screening stage")
        _endpoint_setting(settings.endpoint)  # before any credential is built
        cred, description, owned = resolve_credential(settings, credential)
        screener = cls(
            settings.endpoint,
            cred,
            thresholds=settings.thresholds(),
            blocklists=settings.blocklists,
            output_type=settings.output_type,
            timeout_s=settings.timeout_s,
            retries=settings.retries,
            max_concurrency=settings.max_concurrency,
            log_prompts=settings.log_prompts,
            owns_credential=owned,
        )
        if not screener.uses_key:
            try:
                check_token(cred, description, max(30.0, 3 * settings.timeout_s))  # type: ignore[arg-type]
            except ConfigError:
                screener.close()
                raise
        log.info(
            "Content screening on",
            extra={
                "content_safety": {
                    "endpoint": screener.endpoint,
                    "auth": description,
                    "thresholds": screener.thresholds,
                    "blocklists": screener.blocklists,
                    "output_type": screener.output_type,
                    "timeout_s": settings.timeout_s,
                    "retries": settings.retries,
                    "fail_open": settings.fail_open,
                }
            },
        )
        return screener

    # -- the Screener protocol -------------------------------------------------------------------
    def screen_prompts(self, prompts: Sequence[tuple[str, str | None]]) -> list[Verdict]:
        """Screen each prompt and its negative prompt; long texts in chunks, identical texts once."""
        started = time.perf_counter()
        per_row: list[list[str]] = []
        unique: dict[str, None] = {}
        for prompt, negative in prompts:
            chunks = [c for text in (prompt, negative) if text and text.strip() for c in chunk_text(text)]
            per_row.append(chunks)
            unique.update(dict.fromkeys(chunks))
        results = self._run({c: partial(self._analyze_text, c) for c in unique})
        verdicts = [self._verdict("prompt", [results[c] for c in chunks]) for chunks in per_row]
        self._log_done("prompt", verdicts, len(unique), started, [p for p, _ in prompts])
        return verdicts

    def screen_images(self, images: Sequence[bytes]) -> list[Verdict]:
        """Screen each encoded image (identical images once); oversized ones through a fitted copy."""
        started = time.perf_counter()
        digests = [hashlib.sha256(data).hexdigest() for data in images]
        unique = dict(zip(digests, images, strict=True))
        results = self._run({d: partial(self._analyze_image, data) for d, data in unique.items()})
        verdicts = [self._verdict("image", [results[d]]) for d in digests]
        self._log_done("image", verdicts, len(unique), started, None)
        return verdicts

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
        if self._owns_credential:
            close = getattr(self._credential, "close", None)
            if callable(close):
                close()

    # -- calls -----------------------------------------------------------------------------------
    def _run(self, calls: Mapping[str, Callable[[], _T]]) -> dict[str, _T]:
        """Run all calls concurrently; the first failure cancels what has not started and is raised."""
        futures: dict[str, Future[_T]] = {name: self._pool.submit(call) for name, call in calls.items()}
        done, pending = wait(futures.values(), return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in done:
            exc = future.exception()
            if exc is not None:
                raise exc
        return {name: future.result() for name, future in futures.items()}

    def _analyze_text(self, text: str) -> _Analysis:
        options = AnalyzeTextOptions(text=text, blocklist_names=self.blocklists or None, output_type=self.output_type)
        result = self._call("text", lambda: self._client.analyze_text(options, **self._call_kwargs))
        hits = tuple(dict.fromkeys(m.blocklist_name for m in (result.blocklists_match or [])))
        return self._severities("text", result.categories_analysis), hits

    def _analyze_image(self, data: bytes) -> _Analysis:
        try:
            prepared = prepare_image(data)
        except ValueError as exc:
            metrics.SCREENING_CALLS.labels("image", "bad_request").inc()
            raise ScreeningUnavailable(
                f"Content screening is unavailable: an image could not be prepared for screening ({exc})."
            ) from None
        if prepared.changed:
            metrics.SCREENING_IMAGES_ADAPTED.inc()
            log.debug(
                "Image %s for screening: %dx%d (%d bytes) -> %dx%d (%d bytes)",
                prepared.action,
                prepared.original_width,
                prepared.original_height,
                len(data),
                prepared.width,
                prepared.height,
                len(prepared.data),
            )
        options = AnalyzeImageOptions(image=ImageData(content=prepared.data))
        result = self._call("image", lambda: self._client.analyze_image(options, **self._call_kwargs))
        return self._severities("image", result.categories_analysis), ()

    def _call(self, kind: str, call: Callable[[], _T]) -> _T:
        started = time.perf_counter()
        try:
            result = call()
        except AzureError as exc:
            outcome, cause = self._describe_failure(exc)
            metrics.SCREENING_CALLS.labels(kind, outcome).inc()
            log.warning("Content Safety %s call failed: %s", kind, cause, extra={"outcome": outcome})
            raise ScreeningUnavailable(
                f"Content screening is unavailable: {cause}. Nothing unscreened is returned."
            ) from None
        finally:
            metrics.SCREENING_CALL_SECONDS.labels(kind).observe(time.perf_counter() - started)
        metrics.SCREENING_CALLS.labels(kind, "ok").inc()
        return result

    def _describe_failure(self, exc: Exception) -> tuple[str, str]:
        """(metric outcome, a cause for the 503 message) for an SDK error; never the key or the content."""
        host = urlsplit(self.endpoint).netloc
        retried = f" after {self.retries} retr{'y' if self.retries == 1 else 'ies'}" if self.retries else ""
        status = getattr(exc, "status_code", None)
        if isinstance(exc, HttpResponseError) and status is not None:
            error = getattr(exc, "error", None)
            code = getattr(error, "code", None) or ""
            detail = f" {code}" if code and code != str(status) else ""
            if status in (401, 403):
                what = "key (CONTENT_SAFETY_KEY)" if self.uses_key else "token (check the identity's role)"
                return "auth", f"Azure AI Content Safety rejected the {what} (HTTP {status}{detail})"
            if status == 429:
                return "throttled", f"Azure AI Content Safety is throttling requests (HTTP 429){retried}"
            if status >= 500:
                return "server_error", f"Azure AI Content Safety failed (HTTP {status}{detail}){retried}"
            if status == 404:
                return "not_found", (
                    f"Azure AI Content Safety answered HTTP 404{detail} (check CONTENT_SAFETY_ENDPOINT and the "
                    "names in CONTENT_SAFETY_BLOCKLISTS)"
                )
            message = getattr(error, "message", None) or ""
            return "bad_request", f"Azure AI Content Safety refused the call (HTTP {status}{detail}: {message[:200]})"
        if isinstance(exc, ClientAuthenticationError):  # no response: getting the token failed
            return "auth", f"no Entra ID token for Azure AI Content Safety ({_first_line(exc, 200)})"
        if isinstance(exc, (ServiceRequestTimeoutError, ServiceResponseTimeoutError)):
            return "timeout", f"Azure AI Content Safety at {host} did not answer within {self.timeout_s:g} s{retried}"
        if isinstance(exc, ServiceResponseError):
            return "unreachable", f"the connection to Azure AI Content Safety at {host} was dropped{retried}"
        if isinstance(exc, ServiceRequestError):
            return "unreachable", f"cannot connect to Azure AI Content Safety at {host}{retried}"
        return "error", f"Azure AI Content Safety call failed ({type(exc).__name__})"

    # -- verdicts --------------------------------------------------------------------------------
    def _severities(self, kind: str, analysis: Sequence[Any] | None) -> dict[str, int]:
        found: dict[str, int] = {}
        for item in analysis or []:
            name = _CANONICAL.get(str(item.category).lower())
            if name is not None and item.severity is not None:
                found[name] = max(found.get(name, 0), int(item.severity))
        missing = [name for name in CATEGORIES if name not in found]
        if missing:
            # An answer without a category cannot be read as "safe" for that category.
            metrics.SCREENING_CALLS.labels(kind, "incomplete").inc()
            raise ScreeningUnavailable(
                "Content screening is unavailable: Azure AI Content Safety returned no severity for "
                f"{', '.join(missing)}. Nothing unscreened is returned."
            )
        return found

    def _verdict(self, stage: Stage, analyses: Sequence[_Analysis]) -> Verdict:
        severities = dict.fromkeys(CATEGORIES, 0)
        hits: dict[str, None] = {}
        for found, names in analyses:
            for name, value in found.items():
                severities[name] = max(severities[name], value)
            hits.update(dict.fromkeys(names))
        blocked = {name: value for name, value in severities.items() if value >= self.thresholds[name]}
        return Verdict(stage, bool(blocked or hits), severities, blocked, tuple(hits))

    def _log_done(
        self, stage: str, verdicts: Sequence[Verdict], calls: int, started: float, prompts: Sequence[str] | None
    ) -> None:
        for i, verdict in enumerate(verdicts):
            if verdict.blocked:
                extra: dict[str, Any] = {"stage": stage, "item": i, **verdict.as_record()}
                if self.log_prompts and prompts is not None:
                    extra["prompt"] = prompts[i]
                log.info("Content screening blocked %s %d", stage, i, extra={"screening": extra})
        log.debug(
            "Screened %d %s(s) with %d call(s) in %.1f ms",
            len(verdicts),
            stage,
            calls,
            1000 * (time.perf_counter() - started),
        )


def _session(pool_size: int) -> requests.Session:
    """A requests session whose connection pool holds as many connections as calls may be in flight."""
    session = requests.Session()
    # Retries belong to the SDK's retry policy, not to urllib3 (as in azure-core's own session).
    no_retries = Retry(total=False, redirect=False, raise_on_status=False)
    adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool_size, max_retries=no_retries)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class BoundedRetryPolicy(RetryPolicy):  # type: ignore[type-arg]
    """azure-core's retry policy, with a server's Retry-After capped at the backoff maximum, so one
    throttled call cannot hold a request for as long as the service asks.

    azure-core retries a POST only on 500/503/504 answers, never after a read timeout or a dropped
    connection. The analyze calls change nothing on the service, so they are safe to repeat: every
    failure the retry budget covers is retried, and "after N retries" in the 503 message is true.
    """

    def _is_method_retryable(self, settings: Any, request: Any, response: Any = None) -> bool:
        return True

    def _sleep_for_retry(self, response: Any, transport: Any) -> bool:
        retry_after = self.get_retry_after(response)
        if retry_after:
            transport.sleep(min(float(retry_after), float(self.backoff_max)))
            return True
        return False
