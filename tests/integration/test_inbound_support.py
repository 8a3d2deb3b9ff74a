"""Shared pieces of the inbound integration tests (no tests here): a products table with a write
audit (a trigger records every INSERT/UPDATE, so "applied once" is counted, not assumed), a dx.yaml
with an inbound route, and a third party as a real HTTP server on localhost."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg

from tests.integration.test_source_support import create_topic, write_config

Reply = tuple[int, dict[str, str], Any]
Handler = Callable[[str, str, dict[str, str], dict[str, str], bytes], Reply]

PRODUCTS = """
CREATE TABLE products (id int PRIMARY KEY, sku text NOT NULL, name varchar(40) NOT NULL,
                       price numeric(10,2), seq int);
CREATE TABLE writes (id int, op text, at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO writes (id, op) VALUES (NEW.id, TG_OP); RETURN NEW; END $$;
CREATE TRIGGER products_audit AFTER INSERT OR UPDATE ON products
    FOR EACH ROW EXECUTE FUNCTION audit();
"""


def products_table(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute(PRODUCTS)


def inbound_config(tmp_path: Path, stack: Any, db_url: str, topic: str, inbound: str,
                   route: str = "products", partitions: int = 2) -> Path:
    """A json source route on ``products`` with the given ``inbound:`` block (indented YAML)."""
    create_topic(stack, topic, partitions=partitions)
    return write_config(tmp_path / "dx.yaml", stack, db_url, f"""  - name: {route}
    topic: {topic}
    format: json
    origin: pim
    table: products
    columns: [id, sku, name, price, seq]
    inbound:
{inbound}
""")


def writes(db_url: str) -> dict[int, int]:
    """Writes per product id (INSERTs and UPDATEs that changed something)."""
    with psycopg.connect(db_url) as conn:
        return {int(i): int(n) for i, n in conn.execute(
            "SELECT id, count(*) FROM writes GROUP BY id").fetchall()}


def rows(db_url: str) -> dict[int, tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return {int(r[0]): tuple(r[1:]) for r in conn.execute(
            "SELECT id, sku, name, price, seq FROM products").fetchall()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThirdParty:
    """A real HTTP server; ``handler(method, path, query, headers, body)`` answers. Every
    request is kept in ``requests`` as (method, path, query)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                outer.requests.append((self.command, parts.path, query))
                status, headers, payload = outer.handler(
                    self.command, parts.path, query, dict(self.headers), body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
