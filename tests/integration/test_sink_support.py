"""Pieces shared by the sink tests: a real HTTP server playing the third-party system (scripted
per request), and a producer of real change events (Avro, Confluent framing, registered schemas).
No tests here; the name makes pytest import it like the test modules that use it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.kafka_support import create_topic as create_topic  # re-exported: the tests use it


@dataclass
class Req:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int = 0

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
            disable_nagle_algorithm = True  # else delayed ACKs cap keep-alive at 25 req/s

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
                req.status = resp.status if not resp.delay_s else -resp.status  # slow: unknown
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
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

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


# -- change events ------------------------------------------------------------------------------

SPEC_COLUMNS = (("id", "int4", False), ("name", "text", True), ("behaviour", "text", True),
                ("seq", "int4", True), ("price", "numeric", True))


def table_spec(topic: str) -> Any:
    from pipeline.capture.spec import ColumnSpec, TableSpec

    cols = tuple(ColumnSpec(n, t, nullable, precision=10 if t == "numeric" else None,
                            scale=2 if t == "numeric" else None) for n, t, nullable in SPEC_COLUMNS)
    return TableSpec(entity="public.products", schema="public", table="products", topic=topic,
                     key=("id",), columns=cols)


class EventProducer:
    """Produces real change events (Debezium envelope, Avro, registered schemas) like the relay."""

    def __init__(self, stack: Any, topic: str, prefix: str) -> None:
        from confluent_kafka import Producer

        from pipeline.events.avro import key_schema, value_schema
        from pipeline.events.wire import SchemaRegistrar, registry_client

        self.topic = topic
        create_topic(stack, topic)  # unless the test made it (with more partitions) already
        spec = table_spec(topic)
        reg = SchemaRegistrar(registry_client(stack.schema_registry_url), stack.schema_registry_url)
        self.key = reg.get(f"{topic}-key", key_schema(spec, prefix))
        self.value = reg.get(f"{topic}-value", value_schema(spec, prefix))
        self.producer = Producer({"bootstrap.servers": stack.kafka_bootstrap,
                                  "enable.idempotence": True, "linger.ms": 5})
        self.sent: list[dict[str, Any]] = []

    def envelope(self, id: int, *, op: str = "u", name: str = "n", behaviour: str = "ok",
                 seq: int = 0, origin: str | None = None, price: Any = None) -> dict[str, Any]:
        from decimal import Decimal

        row = {"id": id, "name": name, "behaviour": behaviour, "seq": seq,
               "price": Decimal(price) if price is not None else Decimal("9.99")}
        return {
            "before": row if op in ("u", "d") else None, "after": None if op == "d" else row,
            "source": {"version": "0.1", "connector": "dx", "name": "test", "ts_ms": 1,
                       "snapshot": None, "db": "dx", "schema": "public", "table": "products",
                       "txId": None, "sequence": None},
            "op": op, "ts_ms": int(time.time() * 1000), "event_id": str(uuid.uuid4()),
            "origin": origin}

    def send(self, id: int, **kw: Any) -> dict[str, Any]:
        env = self.envelope(id, **kw)
        headers = [("dx.event_id", env["event_id"].encode())]
        if env["origin"]:
            headers.append(("dx.origin", env["origin"].encode()))
        self.producer.produce(self.topic, key=self.key.encode({"id": id}),
                              value=self.value.encode(env), headers=headers)
        self.producer.poll(0)
        self.sent.append(env)
        return env

    def send_raw(self, id: int, value: bytes) -> None:
        self.producer.produce(self.topic, key=self.key.encode({"id": id}), value=value)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0


def read_topic(stack: Any, topic: str, n: int, timeout: float = 30) -> list[Any]:
    """The first ``n`` raw messages of a topic (all partitions)."""
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": str(uuid.uuid4()),
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is not None and m.error() is None:
                out.append(m)
    finally:
        c.close()
    return out


def write_config(path: Any, stack: Any, db_url: str, prefix: str, sinks: str,
                 client: dict[str, Any] | None = None, extra: str = "") -> Any:
    path.write_text(f"""
{extra}
database:
  url: {db_url}
kafka:
  bootstrap_servers: {stack.kafka_bootstrap}
  topic_prefix: {prefix}
  client: {json.dumps(client or {})}
schema_registry:
  url: {stack.schema_registry_url}
sinks:
{sinks}
""")
    return path


@contextmanager
def sink_thread(config_path: Any, route: str, **kw: Any) -> Iterator[Any]:
    from pipeline.config.loader import load_config
    from pipeline.sink.worker import SinkWorker

    worker = SinkWorker(load_config(config_path), route, redrive_poll_s=0.2, **kw)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as err:
            errors.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_for(lambda: worker.assigned.is_set() or errors, 60, what="partition assignment")
    if errors:
        raise errors[0]
    try:
        yield worker
    finally:
        worker.stop.set()
        t.join(60)
    if errors:
        raise errors[0]


def tasks(db_url: str, route: str) -> list[dict[str, Any]]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        return list(conn.execute(
            "SELECT * FROM dx.task WHERE route = %s ORDER BY id", (route,)).fetchall())


def dx(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``dx ARGS -c CFG`` as a subprocess (the CLI users run)."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60)
