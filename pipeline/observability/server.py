"""One small HTTP server per worker: ``/metrics``, ``/healthz`` and ``/readyz``.

Why three endpoints and not one:

* ``/metrics`` — Prometheus text (or OpenMetrics when the scraper asks for it).
* ``/healthz`` — *liveness*: the process is alive **and** its main loop is turning. A worker whose
  loop is stuck (a deadlock, a hung client call without timeout) still answers HTTP from this
  thread, so liveness is tied to :meth:`WorkerServer.heartbeat`, which the main loop calls every
  iteration (and while it waits: in a standby loop, between retry back-offs). When the last beat
  is older than ``heartbeat_timeout_s`` the answer is 503 and the orchestrator restarts the pod.
* ``/readyz`` — *readiness*: the worker is doing its job. It starts at 503 and turns 200 only when
  the worker says so with :meth:`WorkerServer.set_ready` — a consumer once it has its partition
  assignment, the relay once it holds the lease. A hot-standby relay is live but not ready, which
  is what ``/readyz`` reports. A worker going down on SIGTERM calls ``set_ready(False,
  "stopping")`` first.
* ``/readyz?standby=ok`` — the same, but a worker that declared itself a *healthy standby* with
  :meth:`WorkerServer.set_standby` (a relay waiting for the lease, a consumer-group member left
  without partitions because replicas exceed partitions) counts as ready. Kubernetes probes use
  this form: a Deployment whose standby pod is never Ready would never finish a rolling update.
  The strict form stays for people and alerts; ``dx_relay_active`` tells who is active.

The server runs in a daemon thread (stdlib :mod:`http.server`, no extra dependency) so it can never
keep a stopping worker alive. Port 0 means *disabled* (the CLI default, ``--metrics-port`` /
``DX_METRICS_PORT``): the object still exists and accepts every call, so a worker never branches on
whether metrics are on. Tests and ad-hoc runs use :meth:`WorkerServer.on_free_port`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

#: Environment twin of ``--metrics-port``.
PORT_ENV = "DX_METRICS_PORT"
#: Environment twin of ``--metrics-host``.
HOST_ENV = "DX_METRICS_HOST"
#: The port the container image and the Kubernetes manifests use.
DEFAULT_CONTAINER_PORT = 9400


def port_from_env(default: int = 0) -> int:
    """``DX_METRICS_PORT`` as an int (``default`` when unset); for code paths without typer."""
    raw = os.environ.get(PORT_ENV, "").strip()
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError as err:
        raise ValueError(f"{PORT_ENV} must be a port number, got {raw!r}") from err
    if not 0 <= port <= 65535:
        raise ValueError(f"{PORT_ENV} must be between 0 and 65535, got {port}")
    return port


class WorkerServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` for one worker process.

    ``WorkerServer(port, host)`` binds immediately (a port already in use fails at start-up, not
    at the first scrape) and serves from a daemon thread; ``port=0`` disables it. Thread-safe:
    the main loop, consumer callbacks and the HTTP thread all touch the state.
    """

    def __init__(self, port: int, host: str = "0.0.0.0", *,  # noqa: S104 - pods listen on all
                 registry: CollectorRegistry = REGISTRY,
                 heartbeat_timeout_s: float = 120.0) -> None:
        if port < 0:
            raise ValueError("port must be >= 0 (0 disables the server)")
        self.registry = registry
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._lock = threading.Lock()
        self._ready = False
        self._standby = False
        self._reason = "starting"
        self._beat = time.monotonic()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        if port:
            self._start(host, port)

    @classmethod
    def on_free_port(cls, host: str = "127.0.0.1", **kwargs: Any) -> WorkerServer:
        """A server on a port the OS picks (tests, the demo); read it from :attr:`port`."""
        server = cls(0, host, **kwargs)
        server._start(host, 0)
        return server

    def _start(self, host: str, port: int) -> None:
        handler = type("_BoundHandler", (_Handler,), {"owner": self})
        httpd = ThreadingHTTPServer((host, port), handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.5},
            name="dx-metrics-http", daemon=True)
        self._thread.start()
        log.info("serving /metrics, /healthz, /readyz on %s:%d", host, self.port)

    # -- what the worker calls -------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether a socket is listening (false for port 0)."""
        return self._httpd is not None

    @property
    def port(self) -> int:
        """The bound port (0 when disabled)."""
        return int(self._httpd.server_address[1]) if self._httpd else 0

    @property
    def url(self) -> str | None:
        """``http://host:port`` of the server, or None when disabled."""
        if self._httpd is None:
            return None
        host = str(self._httpd.server_address[0])
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.port}"  # noqa: S104

    def set_ready(self, ready: bool, reason: str = "") -> None:
        """Declare the worker ready (assignment received, lease held) or not, with why."""
        self._set(ready, False, reason or ("ready" if ready else "not ready"))

    def set_standby(self, reason: str = "standby") -> None:
        """Declare a healthy standby: not doing the work, but able to take it over at once."""
        self._set(False, True, reason)

    def set_assignment(self, partitions: int, *, stopping: bool = False) -> None:
        """Readiness of a consumer-group member: ready with partitions, a declared standby
        without (more members than partitions), never ready again once stopping."""
        if stopping:
            self.set_ready(False, "stopping")
        elif partitions:
            self.set_ready(True, f"{partitions} partition(s) assigned")
        else:
            self.set_standby("no partitions assigned (more group members than partitions)")

    def _set(self, ready: bool, standby: bool, reason: str) -> None:
        with self._lock:
            changed = (ready, standby, reason) != (self._ready, self._standby, self._reason)
            self._ready, self._standby, self._reason = ready, standby, reason
        if changed:
            state = "ready" if ready else "standby" if standby else "not ready"
            log.info("readiness: %s (%s)", state, reason)

    def heartbeat(self) -> None:
        """Record that the main loop turned; call it every iteration and while waiting."""
        with self._lock:
            self._beat = time.monotonic()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Liveness and its details (what ``/healthz`` answers)."""
        with self._lock:
            age = time.monotonic() - self._beat
        alive = age <= self.heartbeat_timeout_s
        return alive, {"status": "ok" if alive else "stalled",
                       "heartbeat_age_s": round(age, 3),
                       "heartbeat_timeout_s": self.heartbeat_timeout_s}

    def readiness(self, standby_ok: bool = False) -> tuple[bool, dict[str, Any]]:
        """Readiness and its reason (what ``/readyz`` answers); a stalled loop is never ready.

        With ``standby_ok`` a declared standby counts as ready (``/readyz?standby=ok``).
        """
        alive, _ = self.health()
        with self._lock:
            declared, standby, reason = self._ready, self._standby, self._reason
        status = "ready" if declared else "standby" if standby else "not ready"
        if not alive:
            status, reason = "not ready", "main loop stalled"
        ready = alive and (declared or (standby and standby_ok))
        return ready, {"status": status, "reason": reason}

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> WorkerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    """Routes the three paths; anything else is 404. Scrapes are not logged (too chatty)."""

    owner: ClassVar[WorkerServer]
    server_version = "dx"
    sys_version = ""

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        path = path.rstrip("/") or "/"
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, encoder(self.owner.registry), content_type)
        elif path == "/healthz":
            ok, body = self.owner.health()
            self._json(200 if ok else 503, body)
        elif path == "/readyz":
            ok, body = self.owner.readiness(standby_ok="standby=ok" in query.split("&"))
            self._json(200 if ok else 503, body)
        elif path == "/":
            self._send(200, b"dx worker: /metrics /healthz /readyz\n", "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, (json.dumps(body) + "\n").encode(), "application/json")

    def _send(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
