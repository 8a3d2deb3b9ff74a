"""Data Exchange API benchmark: requests/s and p50/p99 latency of the generated API beside a
hand-written endpoint doing the same SQL work, both on uvicorn in this process, same database.

    python bench/api.py                   # services from DX_* env vars or deploy/local/stack
    python bench/api.py --quick           # the same, smaller (about 20 s)
    python bench/api.py --entities file   # entity and key in dx.yaml instead of the database

By default the entity and the API key live in the database, as the console stores them
(``dx.api_entity``, ``dx.api_key``), and ``--replicas`` (2) ``dx api serve`` instances run
with their reload watcher. Before every round the entity is edited the way the console does it and
the round waits until every replica has reloaded it, so each round measures a freshly reloaded
state. Scenarios (one keep-alive client, sequential requests, after a warm-up), dx and the baseline
taking turns in short blocks within each round so both see the same machine load:

* ``GET by id``: one row by primary key.
* ``filtered list``: ``status=active & price[gte]=10 & price[lt]=500``, sorted by price, 50 rows,
  with the total count.
* ``batch POST``: ``--batch`` rows per request in one transaction, ``dx.origin`` set.

The baseline is FastAPI + psycopg with fixed SQL strings and no validation, keys or errors; the
difference is what the generated layer (auth, rate limit, validation, identifier quoting,
JSON paths, OpenAPI-shaped responses) costs. ``dx/base`` is dx's requests/s over the baseline's,
over all rounds (each round's ratio in brackets): ratios from one run hold on a busy machine,
absolute figures do not.
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
from dataclasses import dataclass, field
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

from pipeline.api import managed  # noqa: E402
from pipeline.api.app import DataExchangeApi, create_app  # noqa: E402
from pipeline.api.query import render_row  # noqa: E402
from pipeline.api.store import Pool  # noqa: E402
from pipeline.config.api import ApiEntity  # noqa: E402

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
ENTITY: dict[str, Any] = {
    "alias": "products", "table": "products",
    "fields": {"id": {"creatable": False, "editable": False},
               "sku": {"editable": False, "max_length": 40},
               "name": {"min_length": 1}, "price": {"min_value": 0},
               "status": {"enum": ["active", "archived"]}}}
LIST = {"status": "active", "price[gte]": "10", "price[lt]": "500", "sort": "price",
        "limit": "50"}
BASE_LIST = {"status": "active", "price_gte": "10", "price_lt": "500"}


def config(db: str, env: dict[str, str], entities_in_file: bool) -> str:
    head = f"""
database: {{url: "{db}"}}
kafka: {{bootstrap_servers: "{env.get('DX_KAFKA_BOOTSTRAP', 'localhost:9092')}"}}
schema_registry: {{url: "{env.get('DX_SCHEMA_REGISTRY_URL', 'http://localhost:8081')}"}}
api:
  max_batch: 100000
  rate_limit: {{requests: 1000000, per_s: 1}}
"""
    if not entities_in_file:
        return head
    fields = "\n".join(f"        {name}: {{{', '.join(f'{k}: {v}' for k, v in rule.items())}}}"
                       .replace("True", "true").replace("False", "false")
                       .replace("'", "") for name, rule in ENTITY["fields"].items())
    return head + f"""  keys:
    - {{id: bench, system: bench, secret_env: BENCH_API_KEY, scopes: {{"*": [read, write]}}}}
  entities:
    - alias: products
      table: products
      fields:
{fields}
"""


def store_in_database(db: str) -> str:
    """The entity and a key as the console saves them; the key's secret (shown once)."""
    with psycopg.connect(db) as conn:
        managed.ensure_schema(conn)
        managed.save(conn, ApiEntity.model_validate(ENTITY), "bench")
        secret = managed.add_key(conn, "bench", "bench", {"*": ["read", "write"]}, "bench")
        conn.commit()
    return secret


def console_edit(db: str, n: int) -> None:
    """What an admin's save on the console's entity page does (the replicas' watchers see it)."""
    with psycopg.connect(db) as conn:
        managed.save(conn, ApiEntity.model_validate({**ENTITY, "max_limit": 500 + n}), "bench")
        conn.commit()


def reset(db: str) -> None:
    """Back to the 20,000 rows of the start, vacuumed and analyzed: each round reads the same
    table with the same plans (rows written by the previous round would leave the planner with
    stale statistics, and each side's prepared statements with plans of their own)."""
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DELETE FROM products WHERE id > 20000")
        conn.execute("VACUUM ANALYZE products")


def await_reload(replicas: list[DataExchangeApi], n: int, timeout_s: float = 30.0) -> float:
    """Seconds until every replica serves the edit ``n`` (its watcher polls every 2 s)."""
    start = time.perf_counter()
    while any(r.state.entities["products"].max_limit != 500 + n for r in replicas):
        if time.perf_counter() - start > timeout_s:
            raise SystemExit(f"a replica did not reload the console's edit within {timeout_s}s")
        time.sleep(0.05)
    return time.perf_counter() - start


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
                    f"INSERT INTO products (sku, name, price, status) VALUES (%s, %s, %s, %s) "
                    f"RETURNING {cols}",
                    [(r["sku"], r["name"], r["price"], r["status"]) for r in body["data"]],
                    returning=True)
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


@dataclass
class Figures:
    """One scenario on one side, over every round."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    per_round: list[float] = field(default_factory=list)  # req/s of each round

    def add(self, lat: list[float], seconds: float) -> None:
        self.seconds += seconds
        self.latencies += lat
        self.per_round.append(len(lat) / seconds)

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    def pct(self, p: int) -> float:
        return statistics.quantiles(self.latencies, n=100)[p - 1] * 1000


def measure(n: int, block: int, warm: int, calls: list[tuple[Figures, Callable[[int],
             httpx.Response]]]) -> None:
    """``n`` requests per side, in blocks of ``block`` taking turns, so a burst of load from
    elsewhere on the machine lands on both sides alike."""
    for _, call in calls:
        for i in range(warm):
            call(-i - 1)
    lat: list[list[float]] = [[] for _ in calls]
    took = [0.0 for _ in calls]
    for at in range(0, n, block):
        for side, (_, call) in enumerate(calls):
            start = time.perf_counter()
            for i in range(at, min(n, at + block)):
                t = time.perf_counter()
                r = call(i)
                lat[side].append(time.perf_counter() - t)
                if r.status_code >= 300:
                    raise SystemExit(f"{r.request.method} {r.request.url}: {r.status_code} "
                                     f"{r.text[:200]}")
            took[side] += time.perf_counter() - start
    for (figures, _), mine, seconds in zip(calls, lat, took, strict=True):
        figures.add(mine, seconds)


def scenarios(c: httpx.Client, generated: bool, args: argparse.Namespace, tag: str,
              ) -> dict[str, tuple[int, int, int, Callable[[int], httpx.Response]]]:
    """name -> (requests, block, warm-up requests, one request)."""
    params = LIST if generated else BASE_LIST

    def batch(i: int) -> httpx.Response:
        # archived: outside the list scenario's filter
        rows = [{"sku": f"{tag}{i}-{j}", "name": f"New {j}", "price": j % 100 + 0.5,
                 "status": "archived"} for j in range(args.batch)]
        return c.post("/products", json={"data": rows})

    return {
        "GET by id": (args.requests, 50, 30,
                      lambda i: c.get(f"/products/{i * 7919 % 20000 + 1}")),
        "filtered list (50 rows)": (args.requests // 2, 20, 10,
                                    lambda i: c.get("/products", params=params)),
        f"batch POST ({args.batch} rows)": (args.batches, 5, 3, batch),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 smaller rounds (about 20 s)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (dx and baseline interleaved)")
    ap.add_argument("--requests", type=int, default=600,
                    help="GET-by-id requests per round and side (the list scenario: half)")
    ap.add_argument("--batches", type=int, default=40, help="batch POSTs per round and side")
    ap.add_argument("--batch", type=int, default=200, help="rows per batch POST")
    ap.add_argument("--entities", choices=("db", "file"), default="db",
                    help="entity and key in the database as the console stores them (default), "
                         "or in dx.yaml")
    ap.add_argument("--replicas", type=int, default=2,
                    help="dx api instances watching for console edits (requests go to the first)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.requests, args.batches = 2, 300, 20
    in_file = args.entities == "file"
    env = services()
    db = fresh_db(env["DX_DATABASE_URL"], "bench_api")
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(TABLE)
    reset(db)
    key = KEY if in_file else store_in_database(db)
    ours: dict[str, Figures] = {}
    base: dict[str, Figures] = {}
    reloads: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dx.yaml"
        path.write_text(config(db, env, in_file))
        replicas = [create_app(path, env={"BENCH_API_KEY": KEY})
                    for _ in range(1 if in_file else args.replicas)]
        url, s1 = serve(replicas[0].app)
        base_url, s2 = serve(baseline(db))
        with (httpx.Client(base_url=url, headers={"X-Api-Key": key}, timeout=60) as dx_http,
              httpx.Client(base_url=base_url, timeout=60) as base_http):
            for rnd in range(args.rounds):
                if not in_file:
                    console_edit(db, rnd)
                    reloads.append(await_reload(replicas, rnd))
                sides = [(True, dx_http, ours), (False, base_http, base)]
                if rnd % 2:
                    sides.reverse()
                mine = {gen: scenarios(c, gen, args, f"{'G' if gen else 'B'}{rnd}-")
                        for gen, c, _ in sides}
                for name, (n, block, warm, _) in mine[True].items():
                    measure(n, block, warm if rnd == 0 else warm // 3,
                            [(out.setdefault(name, Figures()), mine[gen][name][3])
                             for gen, _, out in sides])
                reset(db)
        s1.should_exit = s2.should_exit = True
        for api in replicas:
            api.close()
    time.sleep(0.5)
    with psycopg.connect(env["DX_DATABASE_URL"], autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db.rsplit("/", 1)[1]}" WITH (FORCE)')
    where = ("dx.yaml" if in_file else
             f"the database (console tables), {len(replicas)} replicas reloaded before each "
             f"round in {max(reloads):.1f}s at most")
    print(f"Data Exchange API vs hand-written SQL endpoint: entity and key from {where}; "
          f"{args.rounds} rounds, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, sequential keep-alive client")
    print(f"  {'scenario':<26}{'dx req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'base req/s':>11}"
          f"{'p50 ms':>8}{'p99 ms':>8}{'dx/base':>9}  per round")
    for name, o in ours.items():
        b = base[name]
        rounds = " ".join(f"{x / y:.2f}" for x, y in zip(o.per_round, b.per_round, strict=True))
        print(f"  {name:<26}{o.rps:>9,.0f}{o.pct(50):>8.1f}{o.pct(99):>8.1f}{b.rps:>11,.0f}"
              f"{b.pct(50):>8.1f}{b.pct(99):>8.1f}{o.rps / b.rps:>9.2f}  [{rounds}]")


if __name__ == "__main__":
    main()
