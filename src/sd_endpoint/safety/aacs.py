"""Screening with Azure AI Content Safety (AACS) through the official SDK, ``azure-ai-contentsafety``.

One rule everywhere: a category blocks when its severity is at or above its threshold; a blocklist hit
blocks. Every call of one ``screen_*`` invocation runs concurrently on a shared, bounded thread pool, and
any failure of the service raises ``ScreeningUnavailable`` (the service then fails closed or open).

Which endpoint and credential (and the start-up token check) are ``aacs_auth.py``'s; the SDK client, its
retries and what its failures mean are ``aacs_client.py``'s.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from azure.ai.contentsafety.models import AnalyzeImageOptions, AnalyzeTextOptions, ImageData
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import AzureError

from sd_endpoint import metrics
from sd_endpoint.errors import ConfigError, ScreeningUnavailable
from sd_endpoint.safety.aacs_auth import call_options, check_token, endpoint_setting, resolve_credential
from sd_endpoint.safety.aacs_client import build_client, describe_failure
from sd_endpoint.safety.base import Stage, Verdict
from sd_endpoint.safety.preprocess import CATEGORIES, OUTPUT_TYPES, chunk_text, prepare_image
from sd_endpoint.settings import ContentSafetySettings

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

log = logging.getLogger(__name__)
_CANONICAL = {name.lower(): name for name in CATEGORIES}
_T = TypeVar("_T")

# What a prompt or image call found: severity per category, and the blocklists that matched.
_Analysis = tuple[dict[str, int], tuple[str, ...]]


def _thresholds(given: Mapping[str, int]) -> dict[str, int]:
    """Every category's threshold: 2 unless ``given`` sets it (names in any case, with or without "_")."""
    thresholds = dict.fromkeys(CATEGORIES, 2)
    for name, value in given.items():
        canonical = _CANONICAL.get(name.lower().replace("_", ""))
        if canonical is None or not 1 <= int(value) <= 7:
            raise ConfigError(
                f"CONTENT_SAFETY_THRESHOLD: a threshold is a category of {', '.join(CATEGORIES)} "
                f"with a value from 1 to 7 (got {name}={value!r})"
            )
        thresholds[canonical] = int(value)
    return thresholds


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
        self.endpoint = endpoint_setting(endpoint)
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"CONTENT_SAFETY_OUTPUT_TYPE: must be one of {', '.join(OUTPUT_TYPES)}")
        self.thresholds = _thresholds(thresholds or {})
        self.blocklists = list(blocklists)
        self.output_type = output_type
        self.timeout_s = timeout_s
        self.retries = retries
        self.log_prompts = log_prompts
        self.uses_key = isinstance(credential, AzureKeyCredential)
        self._credential = credential
        self._owns_credential = owns_credential
        self._call_kwargs = call_options(self.endpoint, self.uses_key)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="aacs")
        self._client = build_client(
            self.endpoint,
            credential,
            timeout_s=timeout_s,
            retries=retries,
            max_concurrency=max_concurrency,
            retry_backoff_s=retry_backoff_s,
            retry_backoff_max_s=retry_backoff_max_s,
        )

    @classmethod
    def from_settings(
        cls, settings: ContentSafetySettings, *, credential: TokenCredential | None = None
    ) -> AzureContentSafetyScreener:
        """Build from CONTENT_SAFETY_* (credentials: see aacs_auth.py); ConfigError names the variable."""
        if not settings.endpoint:
            raise ConfigError("CONTENT_SAFETY_ENDPOINT: required to build the content screening stage")
        endpoint_setting(settings.endpoint)  # before any credential is built
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
            outcome, cause = describe_failure(
                exc, endpoint=self.endpoint, retries=self.retries, timeout_s=self.timeout_s, uses_key=self.uses_key
            )
            metrics.SCREENING_CALLS.labels(kind, outcome).inc()
            log.warning("Content Safety %s call failed: %s", kind, cause, extra={"outcome": outcome})
            raise ScreeningUnavailable(
                f"Content screening is unavailable: {cause}. Nothing unscreened is returned."
            ) from None
        finally:
            metrics.SCREENING_CALL_SECONDS.labels(kind).observe(time.perf_counter() - started)
        metrics.SCREENING_CALLS.labels(kind, "ok").inc()
        return result

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
