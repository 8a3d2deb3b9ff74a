"""Shared pieces of the API tests (no tests here): a shop schema, a dx.yaml with an api:
section, and the API served by a real uvicorn on a free localhost port (in a thread of the test
process)."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from pipeline.api.app import DataExchangeApi, create_app

SCHEMA = """
CREATE TABLE products (
    id serial PRIMARY KEY,
    sku varchar(40) NOT NULL UNIQUE,
    name text NOT NULL,
    price numeric(10, 2) NOT NULL,
    status text NOT NULL DEFAULT 'active',
    cost numeric(10, 2),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE variants (
    id serial PRIMARY KEY,
    product_id int NOT NULL REFERENCES products (id),
    sku varchar(40) NOT NULL UNIQUE,
    color text
);
"""

KEYS = {
    "TEST_API_KEY_PIM": "pim-secret-0123456789",
    "TEST_API_KEY_READER": "reader-secret-0123456789",
    "TEST_API_KEY_ADMIN": "admin-secret-0123456789",
    "TEST_API_CLIENT_ERP": "erp-client-secret-0123456789",
}
WMS_SECRET = "wms-secret-0123456789"
SLOW_SECRET = "slow-secret-0123456789"
BRIEF_SECRET = "brief-client-secret-0123456789"

API_SECTION = f"""
api:
  max_limit: 200
  default_limit: 20
  rate_limit: {{requests: 100000, per_s: 1}}
  keys:
    - id: pim-key
      system: pim
      secret_env: TEST_API_KEY_PIM
      scopes: {{products: [read, write, delete], variants: [read, write, delete]}}
    - id: reader-key
      system: bi
      secret_env: TEST_API_KEY_READER
      scopes: {{"*": [read]}}
    - id: wms-key
      system: wms
      secret_sha256: {hashlib.sha256(WMS_SECRET.encode()).hexdigest()}
      scopes: {{variants: [read, write]}}
    - id: slow-key
      system: slow
      secret_sha256: {hashlib.sha256(SLOW_SECRET.encode()).hexdigest()}
      scopes: {{"*": [read]}}
      rate_limit: {{requests: 3, per_s: 60}}
    - id: admin-key
      system: ops
      secret_env: TEST_API_KEY_ADMIN
      admin: true
  clients:
    - id: erp-client
      system: erp
      secret_env: TEST_API_CLIENT_ERP
      scopes: {{products: [read, write], "*": [read]}}
    - id: brief-client
      system: brief
      secret_sha256: {hashlib.sha256(BRIEF_SECRET.encode()).hexdigest()}
      scopes: {{"*": [read]}}
      token_lifetime_s: 1
      rate_limit: {{requests: 1000, per_s: 1}}
  entities:
    - alias: products
      table: public.products
      delete: true
      fields:
        id: {{creatable: false, editable: false}}
        sku: {{editable: false, pattern: "^[A-Z0-9-]+$", max_length: 20}}
        title: {{column: name, min_length: 2, max_length: 200}}
        price: {{min_value: 0, max_value: 100000}}
        status: {{enum: [active, archived]}}
        updated_at: {{creatable: false, editable: false}}
      relations:
        variants: {{entity: variants, on: {{id: product_id}}}}
    - alias: variants
      table: variants
      delete: true
      fields:
        id: {{creatable: false, editable: false}}
        product_id: {{editable: false}}
        sku: {{}}
        color: {{}}
"""


def write_config(path: Path, db_url: str, stack: Any, *, api: str = API_SECTION,
                 tables: str = "[]", prefix: str = "dxapi") -> Path:
    path.write_text(f"""
database:
  url: {db_url}
kafka:
  bootstrap_servers: {stack.kafka_bootstrap}
  topic_prefix: {prefix}
schema_registry:
  url: {stack.schema_registry_url}
tables: {tables}
{api}
""")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    def __init__(self, api: DataExchangeApi, url: str) -> None:
        self.api = api
        self.url = url

    def client(self, secret: str | None = None, **headers: str) -> httpx.Client:
        h = dict(headers)
        if secret is not None:
            h["X-Api-Key"] = secret
        return httpx.Client(base_url=self.url, headers=h, timeout=60)


@contextmanager
def serve(config_path: Path) -> Iterator[Served]:
    api = create_app(config_path, env=KEYS)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api.app, host="127.0.0.1", port=port,
                                           log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield Served(api, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(20)
        api.close()
