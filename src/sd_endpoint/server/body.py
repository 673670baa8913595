"""Reading a request's body at the edge: its content type (415), its size limit (413, also when
Content-Length lies) and a client that stops sending it (408). Used by ``/score`` and the OpenAI routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request
from starlette.requests import ClientDisconnect

from sd_endpoint.errors import (
    GenerationCancelled,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)

if TYPE_CHECKING:
    from sd_endpoint.server.state import ServerState

# After a refused body (413) we still read up to this much of it, so that the client gets the 413 rather
# than a connection reset (closing a socket with unread data resets it); bigger bodies are cut off.
_DRAIN_LIMIT = 8 * 1024 * 1024


def check_content_type(value: str | None) -> None:
    """JSON, or no Content-Type at all (as score.py accepts: some clients send none)."""
    if value is None or not value.strip():
        return
    media_type = value.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json (got {media_type!r}).")


async def read_body(request: Request, limit: int, chunk_timeout_s: float | None = None) -> bytes:
    """The raw body, refusing more than ``limit`` bytes (413) whether or not Content-Length says so, and
    (408) a client that lets ``chunk_timeout_s`` pass without sending the next chunk: a connection that
    declares a body and trickles it must not hold a socket open for ever. Default: the app's setting."""
    if chunk_timeout_s is None:
        state: ServerState = request.app.state.sd
        chunk_timeout_s = state.settings.body_read_timeout_s
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidRequest("Content-Length is not a number.") from None
        if size > limit:
            if size <= _DRAIN_LIMIT:
                await _drain(request.stream(), _DRAIN_LIMIT)
            raise PayloadTooLarge(f"Request body is {size} bytes; the limit is {limit} (SD_ENDPOINT_MAX_BODY_BYTES).")
    chunks: list[bytes] = []
    received = 0
    stream = request.stream()
    while True:
        try:
            async with asyncio.timeout(chunk_timeout_s):
                chunk = await anext(stream)
        except StopAsyncIteration:
            break
        except ClientDisconnect:  # gone mid-body (or its framing broke and the protocol answered 400 and closed)
            raise GenerationCancelled("The client closed the connection while sending the body.") from None
        except TimeoutError:
            raise RequestTimeout(
                f"The request body did not arrive: no data for {chunk_timeout_s:g} s after {received} bytes "
                "(SD_ENDPOINT_BODY_READ_TIMEOUT_S)."
            ) from None
        received += len(chunk)
        if received > limit:
            await _drain(stream, _DRAIN_LIMIT - received)
            raise PayloadTooLarge(f"Request body is over {limit} bytes, the limit (SD_ENDPOINT_MAX_BODY_BYTES).")
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(stream: AsyncIterator[bytes], budget: int) -> None:
    try:
        async for chunk in stream:
            budget -= len(chunk)
            if budget < 0:
                return
    except Exception:  # the client went away, or the stream was already consumed: nothing to drain
        return
