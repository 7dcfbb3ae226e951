"""A misbehaving HTTP reverse proxy in front of a real ``mlflow server``, for the fault tests.

``FaultyProxy(upstream)`` listens on 127.0.0.1 (port 0) with the stdlib ``http.server`` and
forwards every request to ``upstream`` unchanged, except those a :class:`Fault` rule matches:

- ``status``: answer with that HTTP status (e.g. 503) without forwarding;
- ``forward_then_status``: forward (the server applies the request) and answer with the status
  anyway, the way a proxy that loses an answer does;
- ``delay_s``: wait that long before forwarding (a slow server);
- ``hold``: set :attr:`FaultyProxy.held` and wait until :meth:`FaultyProxy.release` (at most
  ``HOLD_LIMIT_S``), then answer 503 (a request that hangs, e.g. to signal the client meanwhile).

Rules match on the HTTP method and a substring of the path, for the first ``times`` matching
requests (``None`` = all). Every request is logged as ``(method, path, outcome, time.monotonic())``.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOLD_LIMIT_S = 60.0
UPSTREAM_TIMEOUT_S = 60.0
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Fault:
    path: str  # substring of the request path
    method: str | None = None  # None = any method
    status: int | None = None
    forward_then_status: int | None = None
    delay_s: float = 0.0
    hold: bool = False
    times: int | None = None  # how many matching requests; None = all
    hits: int = field(default=0)

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        if self.path not in path:
            return False
        return self.times is None or self.hits < self.times


class FaultyProxy:
    def __init__(self, upstream: str, faults: list[Fault] | None = None) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.faults: list[Fault] = list(faults or [])
        self.log: list[tuple[str, str, str, float]] = []  # method, path, outcome, monotonic time
        self.held = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.uri = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="faulty-proxy", daemon=True)

    def start(self) -> FaultyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def release(self) -> None:
        self._release.set()

    def requests(self, path: str, method: str | None = None) -> list[tuple[str, str, str, float]]:
        with self._lock:
            return [r for r in self.log if path in r[1] and (method is None or r[0] == method)]

    def _rule(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    def _record(self, method: str, path: str, outcome: str) -> None:
        with self._lock:
            self.log.append((method, path, outcome, time.monotonic()))

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        method, path = h.command, h.path
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        fault = self._rule(method, path)
        if fault is not None and fault.hold:
            self._record(method, path, "hold")
            self.held.set()
            self._release.wait(HOLD_LIMIT_S)
            self._reply(h, 503, b'{"error_code": "TEMPORARILY_UNAVAILABLE"}')
            return
        if fault is not None and fault.status is not None:
            self._record(method, path, str(fault.status))
            self._reply(h, fault.status, b'{"error_code": "INTERNAL_ERROR", "message": "injected"}')
            return
        if fault is not None and fault.delay_s:
            self._record(method, path, f"delay {fault.delay_s}")
            time.sleep(fault.delay_s)
        try:
            status, headers, payload = self._forward(method, path, h, body)
        except OSError as exc:
            self._record(method, path, f"upstream error {type(exc).__name__}")
            self._reply(h, 502, b'{"error_code": "BAD_GATEWAY"}')
            return
        if fault is not None and fault.forward_then_status is not None:
            self._record(method, path, f"forwarded {status}, answered {fault.forward_then_status}")
            self._reply(h, fault.forward_then_status, b'{"error_code": "BAD_GATEWAY"}')
            return
        self._record(method, path, str(status))
        self._reply(h, status, payload, headers)

    def _forward(
        self, method: str, path: str, h: BaseHTTPRequestHandler, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=UPSTREAM_TIMEOUT_S)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_HEADERS and k.lower() != "host"}
            headers["Host"] = f"{self.upstream_host}:{self.upstream_port}"
            headers["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_HEADERS | {"content-length"}]
            return resp.status, out, payload
        finally:
            conn.close()

    @staticmethod
    def _reply(
        h: BaseHTTPRequestHandler, status: int, payload: bytes, headers: list[tuple[str, str]] | None = None
    ) -> None:
        try:
            h.send_response(status)
            for key, value in headers or [("Content-Type", "application/json")]:
                h.send_header(key, value)
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
        except OSError:  # the client gave up (timeout, interrupt): nothing to answer
            pass


@contextmanager
def faulty_proxy(upstream: str, faults: list[Fault] | None = None) -> Iterator[FaultyProxy]:
    proxy = FaultyProxy(upstream, faults).start()
    try:
        yield proxy
    finally:
        proxy.stop()
