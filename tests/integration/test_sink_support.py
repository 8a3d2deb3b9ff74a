"""Pieces shared by the sink tests: a real HTTP server playing the third-party system (scripted
per request), and a producer of real change events (Avro, Confluent framing, registered schemas).
No tests here; the name makes pytest import it like the test modules that use it."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Req:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Resp:
    status: int = 200
    body: str = '{"ok": true}'
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


Script = Callable[[Req, int], Resp]  # (request, how many times this Idempotency-Key was seen)


class TargetServer:
    """A real HTTP server on 127.0.0.1 that records every request and answers per ``script``."""

    def __init__(self, script: Script | None = None) -> None:
        self.script: Script = script or (lambda r, n: Resp())
        self.requests: list[Req] = []
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                req = Req(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                          body, time.monotonic())
                idem = req.headers.get("idempotency-key") or str(uuid.uuid4())
                with outer.lock:
                    outer.seen[idem] = outer.seen.get(idem, 0) + 1
                    count = outer.seen[idem]
                    outer.requests.append(req)
                resp = outer.script(req, count)
                if resp.delay_s:
                    time.sleep(resp.delay_s)
                data = resp.body.encode()
                try:
                    self.send_response(resp.status)
                    for k, v in resp.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): that is the point of a slow answer

            do_POST = do_PUT = do_PATCH = do_DELETE = do_GET = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> TargetServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def received(self, status_ok: bool = True) -> list[Req]:
        with self.lock:
            return list(self.requests)


@contextmanager
def target(script: Script | None = None) -> Iterator[TargetServer]:
    with TargetServer(script) as srv:
        yield srv


def wait_for(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.1,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
