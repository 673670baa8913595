"""uvicorn's HTTP/1.1 protocol, answering what it refuses before our app runs as ``{"message": ...}`` JSON.

uvicorn answers two things itself: a request it cannot parse (bad Content-Length or chunk size, a NUL in a
header, HTTP/1.1 without Host) and a request past ``limit_concurrency``; both come back as plain text, which
clients of a JSON API cannot read. This subclass keeps uvicorn's parsing and flow control and changes only
those two answers. It is the h11 protocol on purpose: the same parser whether or not httptools is installed.

Not answerable at all, so not answered: bytes that are not HTTP on a TLS port, a client that closes first,
and a body that stalls (our body-read timeout answers that one with a 408 from the app).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from fastapi.responses import JSONResponse
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from sd_endpoint.errors import InvalidRequest, ServiceUnavailable

log = logging.getLogger("sd_endpoint.server")

BAD_REQUEST_MESSAGE = (
    "Invalid HTTP request: the request line, a header or the body framing could not be parsed "
    "(for example a bad Content-Length or chunk size, a NUL in a header, or HTTP/1.1 without a Host header)."
)

ASGIApp = Any  # uvicorn's own ASGI types are not exported for subclasses


class JsonErrorsH11Protocol(H11Protocol):  # type: ignore[misc]  # uvicorn is follow_imports=skip
    """Set as ``uvicorn.Config(http=...)`` by :func:`sd_endpoint.server.app.uvicorn_config`."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn's own check would answer in plain text; the app wrapper below answers the same check in JSON.
        limit = config.limit_concurrency
        self.limit_concurrency: int | None = None
        if limit is not None:
            self.app: ASGIApp = self._limited(config.loaded_app, limit)

    def _limited(self, app: ASGIApp, limit: int) -> ASGIApp:
        async def limited(scope: Any, receive: Any, send: Any) -> None:
            # Same rule as uvicorn's: this connection counts itself, and this request's task is already in tasks.
            if scope["type"] == "http" and (len(self.connections) >= limit or len(self.tasks) > limit):
                log.warning("Refused a request: %d open connections, the limit is %d", len(self.connections), limit)
                refused = ServiceUnavailable(
                    f"The server has too many open connections (the limit is {limit}, "
                    "SD_ENDPOINT_MAX_CONNECTIONS); retry shortly.",
                    retry_after_s=1,
                    headers={"Connection": "close"},
                )
                await JSONResponse(refused.body(), refused.status_code, refused.headers)(scope, receive, send)
                return
            await app(scope, receive, send)

        return limited

    def send_400_response(self, msg: str) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            # The app has already started its answer: HTTP leaves no room for a second one.
            self.transport.close()
            return
        body = json.dumps(InvalidRequest(BAD_REQUEST_MESSAGE).body()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()
