"""The emulated service: an HTTP server on a thread with the two analyze calls, fault injection and a record
of what was asked. ``AacsEmulator`` is the handle tests hold; ``_Handler`` speaks HTTP. What the calls
answer is ``api.py``'s; the faults are ``faults.py``'s.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from aacs_emulator import api
from aacs_emulator.api import ApiError, RecordedRequest, invalid, sent_auth
from aacs_emulator.faults import FAULT_MODES, Fault, FaultMode, FaultTarget, fault_error, fault_json
from aacs_emulator.policy import DEFAULT_POLICY, Policy, PolicyError

log = logging.getLogger(__name__)

_MAX_BODY_BYTES = 32 * 1024 * 1024
_RECORD_LIMIT = 10_000


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
        """Raise a 401 ApiError unless the request carries the configured key or token (if any)."""
        api.check_auth(headers, self.key, self.token)

    def analyze_text(self, body: Any, record: RecordedRequest) -> dict[str, Any]:
        return api.analyze_text(self.policy, body, record)

    def analyze_image(self, body: Any, record: RecordedRequest) -> dict[str, Any]:
        return api.analyze_image(self.policy, body, record)


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
                raise ApiError(404, "404", "Resource not found")
            if method != "POST":
                raise ApiError(405, "405", f"Method {method} is not allowed.")
            record = RecordedRequest(kind, 0, sent_auth(self.headers))  # type: ignore[arg-type]
            emulator._enter_call(1)
            try:
                payload = self._analyze(kind, parts.query, body, record)
                if payload is None:  # a "down" fault: no answer at all
                    return
                status = record.status = 200
            except ApiError as exc:
                record.status = exc.status
                raise
            finally:
                emulator._enter_call(-1)
                emulator._record(record)
            self._send(200, payload)
        except ApiError as exc:
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
                raise fault_error(fault)
        api.check_api_version(query)
        emulator.check_auth(self.headers)  # type: ignore[arg-type]
        try:
            doc = json.loads(body or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise invalid("The request body is not valid JSON.") from None
        handler = emulator.analyze_text if kind == "text" else emulator.analyze_image
        return handler(doc, record)

    def _admin(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        emulator = self.server.emulator
        if path == "/emulator/health" and method == "GET":
            return 200, {"status": "ok", "fault": fault_json(emulator.fault)}
        if path == "/emulator/requests":
            if method == "GET":
                return 200, [r.summary() for r in emulator.requests]
            if method == "DELETE":
                emulator.clear_requests()
                return 200, {"cleared": True}
        if path == "/emulator/faults":
            if method == "GET":
                return 200, {"fault": fault_json(emulator.fault)}
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
                    raise invalid(
                        f'Send {{"mode": one of {", ".join(FAULT_MODES)}, "target": all|text|image, '
                        f'"delay_s": s, "count": n, "retry_after_s": s}} ({exc}).'
                    ) from None
                return 200, {"fault": fault_json(emulator.fault)}
        if path == "/emulator/policy" and method == "PUT":
            try:
                emulator.policy = Policy.from_dict(json.loads(body or b"null"))
            except (PolicyError, json.JSONDecodeError) as exc:
                raise invalid(str(exc)) from None
            return 200, {"policy": "replaced"}
        raise ApiError(404, "404", "Resource not found")

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, "InvalidRequestBody", "The request body is too large.")
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
