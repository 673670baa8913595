"""The outermost layer of every HTTP request: ids, headers, metrics and the one log line.

Request ids follow azmlinfsrv (``azure-contract.md`` section 3):

* ``x-request-id`` is echoed, or a fresh uuid4 when absent; it is the id on every log line of the request.
* ``x-ms-client-request-id`` is echoed (or filled from ``x-ms-request-id`` when only that was sent).
* ``x-ms-request-id`` is echoed, else taken from ``x-ms-client-request-id``, else from ``x-request-id``.
* Any of them, and ``TraceId`` (echoed too), over 100 characters is refused with 431.
* On ``/score``: ``x-ms-run-fn-exec-ms`` (time to the response, ``%.3f`` ms) and ``x-ms-run-function-failed``.

Written as plain ASGI (not ``BaseHTTPMiddleware``) so that it does not buffer responses or interfere with
the route's view of the client disconnecting.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sd_endpoint import metrics
from sd_endpoint.errors import RequestHeaderTooLarge
from sd_endpoint.logs import request_id

log = logging.getLogger("sd_endpoint.access")

MAX_ID_CHARS = 100
# Longest client-chosen text (a path, an error that quotes input) on the access-log line.
MAX_LOGGED_CHARS = 300
# Route labels for metrics: the paths we serve, everything else is "unmatched" (bounded cardinality).
KNOWN_PATHS = frozenset(
    {
        "/",
        "/ready",
        "/score",
        "/metrics",
        "/swagger.json",
        "/openapi.json",
        "/docs",
        "/v1/images/generations",
        "/v1/images/edits",
        "/playground",
    }
)
# Successful probes and scrapes come every few seconds; they log at DEBUG so they do not drown the rest.
QUIET_PATHS = frozenset({"/", "/ready", "/metrics"})
# Key in scope["state"] (request.state) where the route leaves what the log line should say.
STATE_KEY = "sd_request"


def request_id_headers(headers: Headers) -> dict[str, str]:
    """The id headers of the response; raises RequestHeaderTooLarge (431) like azmlinfsrv."""
    rid = headers.get("x-request-id") or ""
    client_rid = headers.get("x-ms-client-request-id") or ""
    ms_rid = headers.get("x-ms-request-id") or ""
    if len(rid) > MAX_ID_CHARS:
        raise RequestHeaderTooLarge(f"x-request-id must not exceed {MAX_ID_CHARS} characters")
    if len(client_rid) > MAX_ID_CHARS or len(ms_rid) > MAX_ID_CHARS:
        raise RequestHeaderTooLarge(
            f"x-ms-request-id and x-ms-client-request-id must not exceed {MAX_ID_CHARS} characters"
        )
    rid = rid or str(uuid.uuid4())
    out = {"x-request-id": rid}
    if client_rid or ms_rid:
        out["x-ms-client-request-id"] = client_rid or ms_rid
    out["x-ms-request-id"] = ms_rid or client_rid or rid
    trace = headers.get("traceid")
    if trace and len(trace) > MAX_ID_CHARS:
        raise RequestHeaderTooLarge(f"TraceId must not exceed {MAX_ID_CHARS} characters")
    if trace:
        out["TraceId"] = trace
    return out


def _ids_or_refusal(headers: Headers) -> tuple[dict[str, str], RequestHeaderTooLarge | None]:
    """The response's id headers, or fresh ones and the 431 to answer when an id header is too long."""
    try:
        return request_id_headers(headers), None
    except RequestHeaderTooLarge as exc:
        rid = str(uuid.uuid4())
        return {"x-request-id": rid, "x-ms-request-id": rid}, exc


def _shutdown_answer() -> JSONResponse:
    body = {
        "message": "The server is shutting down and the request did not finish within "
        "SD_ENDPOINT_SHUTDOWN_GRACE_S; retry."
    }
    return JSONResponse(body, 503, headers={"Retry-After": "5"})


def _unexpected_error(rid: str) -> JSONResponse:
    body = {"message": f"An unexpected error occurred; see the server log (request id {rid})."}
    return JSONResponse(body, 500)


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope.get("path", "")
        route = path if path in KNOWN_PATHS else "unmatched"
        info: dict[str, Any] = {}
        scope.setdefault("state", {})[STATE_KEY] = info
        status = 500
        response_started = False
        id_headers, refused = _ids_or_refusal(Headers(scope=scope))
        ctx_token = request_id.set(id_headers["x-request-id"])

        async def send_with_headers(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                for name, value in id_headers.items():
                    headers[name] = value
                if route == "/score":
                    headers["x-ms-run-fn-exec-ms"] = f"{(time.perf_counter() - started) * 1000:.3f}"
                    headers["x-ms-run-function-failed"] = str(status >= 500)
            await send(message)

        try:
            if refused is not None:
                info["error"] = refused.message
                await JSONResponse(refused.body(), refused.status_code)(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running once SD_ENDPOINT_SHUTDOWN_GRACE_S has passed (the route
            # has already stopped its generation). Answer 503 rather than let uvicorn send a bare 500.
            info.setdefault("error", "the server shut down before the request finished")
            if response_started:
                raise
            await _shutdown_answer()(scope, receive, send_with_headers)
        except Exception:
            log.exception("Unhandled error while serving %s %s", scope.get("method"), path)
            if not response_started:
                await _unexpected_error(id_headers["x-request-id"])(scope, receive, send_with_headers)
        finally:
            elapsed = time.perf_counter() - started
            metrics.REQUESTS.labels(route, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(route).observe(elapsed)
            self._log(scope, path, status, elapsed, id_headers, info)
            request_id.reset(ctx_token)

    @staticmethod
    def _log(scope: Scope, path: str, status: int, elapsed: float, ids: dict[str, str], info: dict[str, Any]) -> None:
        path = _bounded(path)
        if status >= 500 and status != 503:
            level = logging.WARNING
        elif path in QUIET_PATHS and (status < 400 or status == 503):  # probes, also while not ready yet
            level = logging.DEBUG
        else:
            level = logging.INFO
        if not log.isEnabledFor(level):
            return
        method = scope.get("method", "")
        client = scope.get("client")
        extra: dict[str, Any] = {
            "request_id": ids["x-request-id"],
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(elapsed * 1000, 1),
        }
        if client:
            extra["client"] = client[0]
        if "x-ms-client-request-id" in ids:
            extra["client_request_id"] = ids["x-ms-client-request-id"]
        extra.update({k: _bounded(v) if isinstance(v, str) else v for k, v in info.items()})
        log.log(level, "%s %s %d %.1f ms", method, path, status, elapsed * 1000, extra=extra)


def _bounded(text: str) -> str:
    """Client-controlled text cut to MAX_LOGGED_CHARS, so a 100 kB URL cannot make a 200 kB log line."""
    if len(text) <= MAX_LOGGED_CHARS:
        return text
    return f"{text[:MAX_LOGGED_CHARS]}...({len(text)} characters)"
