"""The emulated service: an HTTP server on a thread with the two analyze calls, fault injection and a record
of what was asked. ``AacsEmulator`` is the handle tests hold; ``_Handler`` speaks HTTP.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from aacs_emulator.limits import (
    API_VERSION,
    CATEGORIES,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_SIDE,
    MAX_TEXT_CHARS,
    MIN_IMAGE_SIDE,
    OUTPUT_TYPES,
)
from aacs_emulator.policy import DEFAULT_POLICY, Policy, PolicyError, image_fingerprint

log = logging.getLogger(__name__)

FaultMode = Literal["down", "slow", "500", "503", "429", "401", "403"]
FAULT_MODES: tuple[str, ...] = ("down", "slow", "500", "503", "429", "401", "403")
FaultTarget = Literal["all", "text", "image"]
_MAX_BODY_BYTES = 32 * 1024 * 1024
_RECORD_LIMIT = 10_000


@dataclass
class Fault:
    """An injected failure: ``count`` matching calls (None: until cleared) fail as ``mode``."""

    mode: FaultMode
    target: FaultTarget = "all"
    delay_s: float = 5.0  # for "slow"
    count: int | None = None
    retry_after_s: int = 1  # for "429"

    def applies(self, kind: str) -> bool:
        return self.target in ("all", kind)


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


class _ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


_FAULT_ERRORS: dict[str, tuple[int, str, str]] = {
    "500": (500, "InternalError", "The server encountered an internal error (emulated)."),
    "503": (503, "ServiceUnavailable", "The service is temporarily unavailable (emulated)."),
    "429": (429, "TooManyRequests", "Rate limit is exceeded (emulated). Try again later."),
    "401": (
        401,
        "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key "
        "for an active subscription and use a correct regional API endpoint for your resource.",
    ),
    "403": (403, "403", "The principal does not have access to this resource (emulated)."),
}


class AacsEmulator:
    """The emulator server; start with ``start()`` or ``with``. Thread-safe; settings can change live."""

    def __init__(
        self,
        policy: Policy | Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        fault: Fault | None = None,
    ) -> None:
        if not isinstance(policy, Policy):
            policy = Policy.from_dict(DEFAULT_POLICY if policy is None else policy)
        self.policy = policy
        self.key = key
        self.token = token
        self._host, self._port = host, port
        self._fault = fault
        self._lock = threading.Lock()
        self._records: list[RecordedRequest] = []
        self._in_flight = 0
        self.max_in_flight = 0  # the most analyze calls handled at once (reset by clear_requests)
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> str:
        server = _Server((self._host, self._port), _Handler)
        server.emulator = self
        self._server = server
        self._stopping.clear()
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="aacs-emulator", daemon=True
        )
        self._thread.start()
        log.info("AACS emulator listening on %s (auth: %s)", self.url, self._auth_description())
        return self.url

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()  # wakes "slow" answers
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> AacsEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the emulator is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The endpoint, as CONTENT_SAFETY_ENDPOINT (no trailing slash)."""
        host = self._host if self._host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The CONTENT_SAFETY_* variables that point an endpoint at this emulator."""
        out = {"CONTENT_SAFETY_ENDPOINT": self.url}
        if self.key:
            out["CONTENT_SAFETY_KEY"] = self.key
        return out

    # -- faults and records ----------------------------------------------------------------------
    def set_fault(
        self,
        mode: FaultMode,
        *,
        target: FaultTarget = "all",
        delay_s: float = 5.0,
        count: int | None = None,
        retry_after_s: int = 1,
    ) -> None:
        if mode not in FAULT_MODES:
            raise ValueError(f"fault mode must be one of {', '.join(FAULT_MODES)}")
        with self._lock:
            self._fault = Fault(mode, target, delay_s, count, retry_after_s)

    def clear_fault(self) -> None:
        with self._lock:
            self._fault = None

    @property
    def fault(self) -> Fault | None:
        with self._lock:
            return self._fault

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._records)

    def clear_requests(self) -> None:
        with self._lock:
            self._records.clear()
            self.max_in_flight = 0

    def _enter_call(self, delta: int) -> None:
        with self._lock:
            self._in_flight += delta
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _take_fault(self, kind: str) -> Fault | None:
        with self._lock:
            fault = self._fault
            if fault is None or not fault.applies(kind):
                return None
            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self._fault = None
            return fault

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._records.append(record)
            del self._records[:-_RECORD_LIMIT]

    def _auth_description(self) -> str:
        modes = [m for m, v in (("Ocp-Apim-Subscription-Key", self.key), ("bearer token", self.token)) if v]
        return " or ".join(modes) if modes else "none (any caller accepted)"

    # -- the API ---------------------------------------------------------------------------------
    def check_auth(self, headers: Mapping[str, str]) -> None:
        """Raise a 401 _ApiError unless the request carries the configured key or token (if any)."""
        sent_key = headers.get("Ocp-Apim-Subscription-Key")
        bearer = headers.get("Authorization", "")
        sent_token = bearer[7:].strip() if bearer[:7].lower() == "bearer " else None
        if self.key is None and self.token is None:
            return
        if sent_key is not None and self.key is not None and _same(sent_key, self.key):
            return
        if sent_token is not None and self.token is not None and _same(sent_token, self.token):
            return
        if sent_key is None and sent_token is None:
            raise _ApiError(
                401,
                "401",
                "Access denied due to missing subscription key. Make sure to include subscription key when making "
                "requests to an API.",
            )
        raise _ApiError(401, *_FAULT_ERRORS["401"][1:])

    def analyze_text(self, body: Any, record: RecordedRequest) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _invalid("The request body must be a JSON object.")
        text = body.get("text")
        if not isinstance(text, str) or not text:
            raise _invalid("The 'text' field is required and must be a non-empty string.")
        record.text = text
        categories = _requested_categories(body.get("categories"))
        names = body.get("blocklistNames") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _invalid("'blocklistNames' must be a list of strings.")
        record.blocklist_names = list(names)
        halt = body.get("haltOnBlocklistHit", False)
        if not isinstance(halt, bool):
            raise _invalid("'haltOnBlocklistHit' must be a boolean.")
        output_type = body.get("outputType", "FourSeverityLevels")
        if output_type not in OUTPUT_TYPES:
            raise _invalid(f"'outputType' must be one of {', '.join(OUTPUT_TYPES)}.")
        record.output_type = output_type
        if len(text) > MAX_TEXT_CHARS:
            raise _invalid(f"The text is too long: {len(text)} characters; the maximum is {MAX_TEXT_CHARS}.")
        policy = self.policy
        for name in names:
            if name not in policy.blocklists:
                raise _ApiError(404, "ResourceNotFound", f"The blocklist '{name}' does not exist.")
        severities = policy.text_severities(text)
        matches = policy.blocklist_matches(text, list(names))
        return {
            "blocklistsMatch": [
                {"blocklistName": m.blocklist, "blocklistItemId": m.item_id, "blocklistItemText": m.text}
                for m in matches
            ],
            "categoriesAnalysis": _analysis(severities, categories, eight=output_type == "EightSeverityLevels"),
        }

    def analyze_image(self, body: Any, record: RecordedRequest) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("image"), dict):
            raise _invalid("The 'image' field is required and must be an object.")
        image = body["image"]
        if ("content" in image) == ("blobUrl" in image):
            raise _invalid("Exactly one of 'image.content' and 'image.blobUrl' must be provided.")
        if "blobUrl" in image:
            raise _invalid("'image.blobUrl' is not supported by the emulator; send 'image.content'.")
        categories = _requested_categories(body.get("categories"))
        if body.get("outputType", "FourSeverityLevels") != "FourSeverityLevels":
            raise _invalid("'outputType' must be FourSeverityLevels for images.")
        content = image["content"]
        try:
            if not isinstance(content, str):
                raise ValueError
            data = base64.b64decode(content, validate=True)
        except (ValueError, binascii.Error):
            raise _invalid("'image.content' must be base64-encoded image bytes.") from None
        record.image_bytes = len(data)
        record.image_sha256 = hashlib.sha256(data).hexdigest()
        if len(data) > MAX_IMAGE_BYTES:
            raise _invalid(f"The image size is too large: {len(data)} bytes; the maximum is 4 MB.")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                record.image_size, record.image_format = im.size, im.format
        except (UnidentifiedImageError, OSError):
            raise _invalid("The image format is not supported.") from None
        width, height = record.image_size
        if min(width, height) < MIN_IMAGE_SIDE:
            raise _invalid("The image size is too small.")
        if max(width, height) > MAX_IMAGE_SIDE:
            raise _invalid(f"The image dimensions are too large: {width}x{height}; the maximum is 2048x2048.")
        digest, mean = image_fingerprint(data)
        return {"categoriesAnalysis": _analysis(self.policy.image_severities(digest, mean), categories, eight=False)}


def _sent_auth(headers: Mapping[str, str]) -> str:
    """Which kind of credential a request carried (valid or not): 'key', 'bearer' or 'none'."""
    if headers.get("Ocp-Apim-Subscription-Key") is not None:
        return "key"
    return "bearer" if headers.get("Authorization", "")[:7].lower() == "bearer " else "none"


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


def _invalid(message: str) -> _ApiError:
    return _ApiError(400, "InvalidRequestBody", message)


def _requested_categories(value: Any) -> list[str]:
    if value is None:
        return list(CATEGORIES)
    if not isinstance(value, list) or not value:
        raise _invalid("'categories' must be a non-empty list.")
    out = []
    for item in value:
        match = [c for c in CATEGORIES if isinstance(item, str) and item.lower() == c.lower()]
        if not match:
            raise _invalid(f"'categories' items must be among {', '.join(CATEGORIES)}.")
        out.append(match[0])
    return out


def _analysis(severities: Mapping[str, int], categories: list[str], *, eight: bool) -> list[dict[str, Any]]:
    return [
        {"category": c, "severity": severities[c] if eight else severities[c] - severities[c] % 2} for c in categories
    ]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    emulator: AacsEmulator

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):  # the client went away (timeouts, drops)
            log.debug("connection from %s ended: %s", client_address, exc)
            return
        log.exception("AACS emulator: error while handling a request from %s", client_address)

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._conn_lock:
            (self._connections.add if add else self._connections.discard)(conn)

    def close_connections(self) -> None:
        """Close idle keep-alive connections, so that handler threads end with the server."""
        with self._conn_lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._connections.clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    server_version = "aacs-emulator"
    timeout = 60  # idle keep-alive connections end after this
    # Headers and body are separate writes: with Nagle on, the body waits for the client's delayed ACK
    # (~40 ms on Linux), which would be the emulator's latency, not the screener's.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        emulator = self.server.emulator
        started = time.perf_counter()
        parts = urlsplit(self.path)
        path = parts.path
        status = 500
        try:
            body = self._read_body()
            if path.startswith("/emulator/"):
                emulator.check_auth(self.headers)  # type: ignore[arg-type]
                status, payload = self._admin(method, path, body)
                self._send(status, payload)
                return
            kind = {"/contentsafety/text:analyze": "text", "/contentsafety/image:analyze": "image"}.get(path)
            if kind is None:
                raise _ApiError(404, "404", "Resource not found")
            if method != "POST":
                raise _ApiError(405, "405", f"Method {method} is not allowed.")
            record = RecordedRequest(kind, 0, _sent_auth(self.headers))  # type: ignore[arg-type]
            emulator._enter_call(1)
            try:
                payload = self._analyze(kind, parts.query, body, record)
                if payload is None:  # a "down" fault: no answer at all
                    return
                status = record.status = 200
            except _ApiError as exc:
                record.status = exc.status
                raise
            finally:
                emulator._enter_call(-1)
                emulator._record(record)
            self._send(200, payload)
        except _ApiError as exc:
            status = exc.status
            headers = {"x-ms-error-code": exc.code, **exc.headers}
            self._send(exc.status, {"error": {"code": exc.code, "message": exc.message}}, headers)
        finally:
            log.info(
                "%s %s -> %s in %.1f ms",
                method,
                path,
                status or "dropped",
                1000 * (time.perf_counter() - started),
            )

    def _analyze(self, kind: str, query: str, body: bytes, record: RecordedRequest) -> dict[str, Any] | None:
        emulator = self.server.emulator
        fault = emulator._take_fault(kind)
        if fault is not None:
            if fault.mode == "down":
                self._drop()
                return None
            if fault.mode == "slow":
                emulator._stopping.wait(fault.delay_s)
            else:
                status, code, message = _FAULT_ERRORS[fault.mode]
                headers = {"Retry-After": str(fault.retry_after_s)} if fault.mode == "429" else {}
                raise _ApiError(status, code, message, headers)
        versions = parse_qs(query).get("api-version")
        if not versions:
            raise _ApiError(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        if versions[0] != API_VERSION:
            raise _ApiError(
                400,
                "UnsupportedApiVersion",
                f"The HTTP resource does not support the API version '{versions[0]}'; use {API_VERSION}.",
            )
        emulator.check_auth(self.headers)  # type: ignore[arg-type]
        try:
            doc = json.loads(body or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _invalid("The request body is not valid JSON.") from None
        handler = emulator.analyze_text if kind == "text" else emulator.analyze_image
        return handler(doc, record)

    def _admin(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        emulator = self.server.emulator
        if path == "/emulator/health" and method == "GET":
            return 200, {"status": "ok", "fault": _fault_json(emulator.fault)}
        if path == "/emulator/requests":
            if method == "GET":
                return 200, [r.summary() for r in emulator.requests]
            if method == "DELETE":
                emulator.clear_requests()
                return 200, {"cleared": True}
        if path == "/emulator/faults":
            if method == "GET":
                return 200, {"fault": _fault_json(emulator.fault)}
            if method == "DELETE":
                emulator.clear_fault()
                return 200, {"fault": None}
            if method == "POST":
                try:
                    doc = json.loads(body or b"{}")
                    emulator.set_fault(
                        doc["mode"],
                        target=doc.get("target", "all"),
                        delay_s=float(doc.get("delay_s", 5.0)),
                        count=doc.get("count"),
                        retry_after_s=int(doc.get("retry_after_s", 1)),
                    )
                except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
                    raise _invalid(
                        f'Send {{"mode": one of {", ".join(FAULT_MODES)}, "target": all|text|image, '
                        f'"delay_s": s, "count": n, "retry_after_s": s}} ({exc}).'
                    ) from None
                return 200, {"fault": _fault_json(emulator.fault)}
        if path == "/emulator/policy" and method == "PUT":
            try:
                emulator.policy = Policy.from_dict(json.loads(body or b"null"))
            except (PolicyError, json.JSONDecodeError) as exc:
                raise _invalid(str(exc)) from None
            return 200, {"policy": "replaced"}
        raise _ApiError(404, "404", "Resource not found")

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY_BYTES:
            self.close_connection = True
            raise _ApiError(413, "InvalidRequestBody", "The request body is too large.")
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("apim-request-id", str(uuid.uuid4()))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _drop(self) -> None:
        """Close the connection with a reset and no answer, as an unreachable service does."""
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close_connection = True


def _fault_json(fault: Fault | None) -> dict[str, Any] | None:
    if fault is None:
        return None
    return {
        "mode": fault.mode,
        "target": fault.target,
        "delay_s": fault.delay_s,
        "count": fault.count,
        "retry_after_s": fault.retry_after_s,
    }
