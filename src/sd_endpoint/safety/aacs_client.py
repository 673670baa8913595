"""The Azure AI Content Safety SDK client as the screener uses it, and what its failures mean.

``build_client`` sets the transport (a connection pool as large as the calls in flight, our timeouts), a
retry policy that covers every failure of the analyze calls, and quiet HTTP logging. ``describe_failure``
turns an SDK error into the metric outcome and the cause the 503 message gives, never the key or content.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
from azure.ai.contentsafety import ContentSafetyClient
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import (
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

from sd_endpoint.safety.aacs_auth import first_line

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

# azure-core logs every request and response at INFO; ours go to a child of the screener's logger
# (sd_endpoint.safety.aacs), quiet unless lowered on purpose (headers are redacted by azure-core either
# way; bodies are never logged).
_http_log = logging.getLogger("sd_endpoint.safety.aacs.http")
_http_log.setLevel(logging.WARNING)


def build_client(
    endpoint: str,
    credential: AzureKeyCredential | TokenCredential,
    *,
    timeout_s: float,
    retries: int,
    max_concurrency: int,
    retry_backoff_s: float,
    retry_backoff_max_s: float,
) -> ContentSafetyClient:
    """The SDK client for ``max_concurrency`` calls in flight, each with ``timeout_s`` and ``retries``."""
    return ContentSafetyClient(
        endpoint,
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


def describe_failure(
    exc: Exception, *, endpoint: str, retries: int, timeout_s: float, uses_key: bool
) -> tuple[str, str]:
    """(metric outcome, a cause for the 503 message) for an SDK error; never the key or the content."""
    host = urlsplit(endpoint).netloc
    retried = f" after {retries} retr{'y' if retries == 1 else 'ies'}" if retries else ""
    status = getattr(exc, "status_code", None)
    if isinstance(exc, HttpResponseError) and status is not None:
        error = getattr(exc, "error", None)
        code = getattr(error, "code", None) or ""
        detail = f" {code}" if code and code != str(status) else ""
        if status in (401, 403):
            what = "key (CONTENT_SAFETY_KEY)" if uses_key else "token (check the identity's role)"
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
        return "auth", f"no Entra ID token for Azure AI Content Safety ({first_line(exc, 200)})"
    if isinstance(exc, (ServiceRequestTimeoutError, ServiceResponseTimeoutError)):
        return "timeout", f"Azure AI Content Safety at {host} did not answer within {timeout_s:g} s{retried}"
    if isinstance(exc, ServiceResponseError):
        return "unreachable", f"the connection to Azure AI Content Safety at {host} was dropped{retried}"
    if isinstance(exc, ServiceRequestError):
        return "unreachable", f"cannot connect to Azure AI Content Safety at {host}{retried}"
    return "error", f"Azure AI Content Safety call failed ({type(exc).__name__})"


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
