"""Data Exchange API benchmark: requests/s and p50/p99 latency of the generated API beside a
hand-written endpoint doing the same SQL work, both on uvicorn in this process, same database.

    python bench/api.py                   # services from DX_* env vars or deploy/local/stack
    python bench/api.py --requests 2000 --batch 500

Scenarios (one keep-alive client, sequential requests, after a warm-up):

* ``GET by id``: one row by primary key.
* ``filtered list``: ``status=active & price[gte]=10 & price[lt]=500``, sorted by price, 50 rows,
  with the total count.
* ``batch POST``: ``--batch`` rows per request in one transaction, ``dx.origin`` set.

The baseline is FastAPI + psycopg with fixed SQL strings and no validation, keys or errors; the
difference is what the generated layer (auth, rate limit, validation, identifier quoting,
JSON paths, OpenAPI-shaped responses) costs.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_stack import fresh_db, services  # noqa: E402

from pipeline.api.app import create_app  # noqa: E402
from pipeline.api.query import render_row  # noqa: E402
from pipeline.api.store import Pool  # noqa: E402

TABLE = """
CREATE TABLE products (
    id serial PRIMARY KEY, sku varchar(40) NOT NULL UNIQUE, name text NOT NULL,
    price numeric(10, 2) NOT NULL, status text NOT NULL DEFAULT 'active'
);
CREATE INDEX ON products (status, price);
INSERT INTO products (sku, name, price, status)
SELECT 'S-' || i, 'Product ' || i, (i % 1000) + 0.99,
       CASE WHEN i % 7 = 0 THEN 'archived' ELSE 'active' END
FROM generate_series(1, 20000) i;
"""
COLUMNS = ("id", "sku", "name", "price", "status")
KEY = "bench-key-0123456789"


def config(db: str, env: dict[str, str]) -> str:
    return f"""
database: {{url: "{db}"}}
kafka: {{bootstrap_servers: "{env.get('DX_KAFKA_BOOTSTRAP', 'localhost:9092')}"}}
schema_registry: {{url: "{env.get('DX_SCHEMA_REGISTRY_URL', 'http://localhost:8081')}"}}
api:
  max_batch: 100000
  rate_limit: {{requests: 1000000, per_s: 1}}
  keys:
    - {{id: bench, system: bench, secret_env: BENCH_API_KEY, scopes: {{"*": [read, write]}}}}
  entities:
    - alias: products
      table: products
      fields:
        id: {{creatable: false, editable: false}}
        sku: {{editable: false, max_length: 40}}
        name: {{min_length: 1}}
        price: {{min_value: 0}}
        status: {{enum: [active, archived]}}
"""


def baseline(db: str) -> FastAPI:
    """The same work with fixed SQL: what someone would write by hand for one table."""
    pool = Pool(db, 8)
    app = FastAPI()
    cols = ", ".join(COLUMNS)

    def rows(cur: Any) -> list[dict[str, Any]]:
        return [render_row(dict(zip(COLUMNS, r, strict=True))) for r in cur]

    @app.get("/products/{pid}")
    def get_one(pid: int) -> JSONResponse:
        with pool.connection() as conn:
            found = rows(conn.execute(f"SELECT {cols} FROM products WHERE id = %s",
                                      (pid,)))
            conn.rollback()
        return JSONResponse({"data": found[0]})

    @app.get("/products")
    def get_list(status: str, price_gte: Decimal, price_lt: Decimal) -> JSONResponse:
        with pool.connection() as conn:
            args = (status, price_gte, price_lt)
            where = "WHERE status = %s AND price >= %s AND price < %s"
            total = conn.execute(f"SELECT count(*) FROM products {where}",
                                 args).fetchone()
            data = rows(conn.execute(
                f"SELECT {cols} FROM products {where} ORDER BY price, id LIMIT 50",
                args))
            conn.rollback()
        return JSONResponse({"data": data, "meta": {"total": total[0] if total else 0}})

    @app.post("/products")
    async def post(request: Request) -> JSONResponse:
        body = await request.json()

        def write() -> list[dict[str, Any]]:
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT set_config('dx.origin', 'bench', true)")
                cur.executemany(
                    f"INSERT INTO products (sku, name, price) VALUES (%s, %s, %s) "
                    f"RETURNING {cols}",
                    [(r["sku"], r["name"], r["price"]) for r in body["data"]], returning=True)
                out = []
                while True:
                    out += rows(cur)
                    if not cur.nextset():
                        break
                conn.commit()
            return out

        from starlette.concurrency import run_in_threadpool

        return JSONResponse({"data": await run_in_threadpool(write)}, status_code=201)

    return app


def serve(app: Any) -> tuple[str, uvicorn.Server]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server


def measure(n: int, call: Callable[[int], httpx.Response]) -> tuple[float, float, float]:
    for i in range(min(50, n)):
        call(-i - 1)
    lat = []
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        r = call(i)
        lat.append(time.perf_counter() - t)
        if r.status_code >= 300:
            raise SystemExit(f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:200]}")
    total = time.perf_counter() - start
    q = statistics.quantiles(lat, n=100)
    return n / total, q[49] * 1000, q[98] * 1000


def reads(url: str, generated: bool, n: int) -> dict[str, tuple[float, float, float]]:
    headers = {"X-Api-Key": KEY} if generated else {}
    params = ({"status": "active", "price[gte]": "10", "price[lt]": "500", "sort": "price",
               "limit": "50"} if generated else
              {"status": "active", "price_gte": "10", "price_lt": "500"})
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        return {
            "GET by id": measure(n, lambda i: c.get(f"/products/{i % 20000 + 1}")),
            "filtered list (50 rows)": measure(n, lambda i: c.get("/products", params=params)),
        }


def writes(url: str, generated: bool, batches: int, size: int,
           tag: str) -> dict[str, tuple[float, float, float]]:
    headers = {"X-Api-Key": KEY} if generated else {}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        def batch(i: int) -> httpx.Response:
            rows = [{"sku": f"{tag}-{i}-{j}", "name": f"New {j}", "price": j % 100 + 0.5}
                    for j in range(size)]
            return c.post("/products", json={"data": rows})

        return {f"batch POST ({size} rows)": measure(batches, batch)}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000, help="requests per read scenario")
    ap.add_argument("--batches", type=int, default=50, help="batch POST requests")
    ap.add_argument("--batch", type=int, default=200, help="rows per batch POST")
    args = ap.parse_args()
    env = services()
    db = fresh_db(env["DX_DATABASE_URL"], "bench_api")
    with psycopg.connect(db) as conn:
        conn.execute(TABLE)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dx.yaml"
        path.write_text(config(db, env))
        api = create_app(path, env={"BENCH_API_KEY": KEY})
        url, s1 = serve(api.app)
        base_url, s2 = serve(baseline(db))
        # reads of both before any write, so both read the same table
        ours, base = reads(url, True, args.requests), reads(base_url, False, args.requests)
        ours |= writes(url, True, args.batches, args.batch, "G")
        base |= writes(base_url, False, args.batches, args.batch, "B")
        s1.should_exit = s2.should_exit = True
        api.close()
    time.sleep(0.5)
    with psycopg.connect(env["DX_DATABASE_URL"], autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db.rsplit("/", 1)[1]}" WITH (FORCE)')
    print(f"Data Exchange API vs hand-written SQL endpoint, {os.cpu_count()} CPUs, sequential "
          "keep-alive client")
    print(f"  {'scenario':<26}{'dx api req/s':>14}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'baseline req/s':>16}{'p50 ms':>9}{'p99 ms':>9}")
    for name, (rps, p50, p99) in ours.items():
        b = base[name]
        print(f"  {name:<26}{rps:>14,.0f}{p50:>9.1f}{p99:>9.1f}{b[0]:>16,.0f}{b[1]:>9.1f}"
              f"{b[2]:>9.1f}")


if __name__ == "__main__":
    main()
