"""Inbound kinds benchmark: webhooks and a paginated pull into the database end to end, beside the
Data Exchange API's batch POST of the same rows, same database, same machine.

    python bench/inbound.py                  # services from DX_* env vars or deploy/local/stack
    python bench/inbound.py --entities 20000 --batch 100 --clients 8

Scenarios (each into its own table; the route's worker ``dx source run`` runs as a subprocess
from before the clock starts, as in production):

* ``webhook``: ``--clients`` keep-alive clients POST HMAC-signed batches of ``--batch`` entities
  to ``dx inbound serve``'s application (uvicorn in this process). *acked* is entities/s
  answered 202 (Kafka acknowledged them); *in DB* is entities/s from the first request until the
  last row is in the table.
* ``pull``: ``dx inbound pull --once`` against a paginated endpoint (pages of ``--page``
  entities, a real HTTP server in this process). *acked*: entities/s read and acknowledged;
  *in DB* as above.
* ``api batch POST`` (baseline): the same clients POST ``{"data": [...]}`` batches to the Data
  Exchange API, which writes them synchronously (no Kafka in between).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import hmac
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import psycopg
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api import serve  # noqa: E402
from bench_stack import fresh_db, services  # noqa: E402

from pipeline.api.app import create_app  # noqa: E402
from pipeline.config.loader import load_config  # noqa: E402
from pipeline.inbound.pull import Puller  # noqa: E402
from pipeline.inbound.webhook import WebhookServer  # noqa: E402

SECRET = "bench-hook-secret"
API_KEY = "bench-key-0123456789"
TABLES = "\n".join(
    f"CREATE TABLE {t} (id int PRIMARY KEY, sku text NOT NULL, name text NOT NULL, "
    f"price numeric(10,2), seq int);" for t in ("p_hook", "p_pull", "p_api"))


def config(db: str, env: dict[str, str], prefix: str, pim: str, page: int) -> str:
    route = """  - name: {name}
    topic: {prefix}.{name}
    format: json
    origin: bench
    table: {name}
    batch_size: 5000
    inbound:
{inbound}"""
    hook = """      webhook:
        auth: {kind: hmac, secret: "${BENCH_HOOK_SECRET}"}
        max_body_bytes: 16777216
"""
    pull = f"""      pull:
        url: {pim}/products
        items: data
        pagination: {{kind: page, size_param: limit, size: {page}}}
"""
    return f"""
database: {{url: "{db}"}}
kafka: {{bootstrap_servers: "{env['DX_KAFKA_BOOTSTRAP']}"}}
schema_registry: {{url: "{env['DX_SCHEMA_REGISTRY_URL']}"}}
sources:
{route.format(name="p_hook", prefix=prefix, inbound=hook)}
{route.format(name="p_pull", prefix=prefix, inbound=pull)}
api:
  max_batch: 100000
  rate_limit: {{requests: 1000000, per_s: 1}}
  keys:
    - {{id: bench, system: bench, secret_env: BENCH_API_KEY, scopes: {{"*": [read, write]}}}}
  entities:
    - alias: products
      table: p_api
      fields: {{id: {{}}, sku: {{}}, name: {{}}, price: {{}}, seq: {{}}}}
"""


def entity(i: int) -> dict[str, Any]:
    return {"id": i, "sku": f"S-{i}", "name": f"Product {i}", "price": i % 1000 + 0.99,
            "seq": 1}


def catalog(n: int) -> tuple[str, ThreadingHTTPServer]:
    """A paginated third party: GET /products?page=P&limit=L."""
    items = [entity(i) for i in range(1, n + 1)]

    class H(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            q = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
            page, limit = int(q.get("page", 1)), int(q.get("limit", 100))
            body = json.dumps({"data": items[(page - 1) * limit:page * limit]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def count(db: str, table: str) -> int:
    with psycopg.connect(db) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def wait_rows(db: str, table: str, n: int, timeout_s: float = 600) -> float:
    deadline = time.monotonic() + timeout_s
    while count(db, table) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"{table}: only {count(db, table)} of {n} rows after {timeout_s}s")
        time.sleep(0.05)
    return time.perf_counter()


def worker(cfg: Path, route: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "source", "run", route,
                             "-c", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def signed(body: bytes) -> dict[str, str]:
    t = str(int(time.time()))
    mac = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Dx-Signature": f"t={t},v1={mac}", "Content-Type": "application/json"}


def post_batches(url: str, path: str, bodies: list[bytes], clients: int,
                 headers: Any) -> float:
    """POST every body with ``clients`` threads; returns the seconds it took."""
    local = threading.local()

    def one(body: bytes) -> None:
        if not hasattr(local, "c"):
            local.c = httpx.Client(base_url=url, timeout=120)
        r = local.c.post(path, content=body, headers=headers(body))
        if r.status_code >= 300:
            raise SystemExit(f"POST {path}: {r.status_code} {r.text[:200]}")

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, bodies))
    return time.perf_counter() - start


def bodies(n: int, batch: int, offset: int, wrap: bool) -> list[bytes]:
    out = []
    for lo in range(1, n + 1, batch):
        rows = [entity(i + offset) for i in range(lo, min(n, lo + batch - 1) + 1)]
        out.append(json.dumps({"data": rows} if wrap else rows).encode())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--entities", type=int, default=10_000, help="entities per scenario")
    ap.add_argument("--batch", type=int, default=50, help="entities per webhook / API request")
    ap.add_argument("--page", type=int, default=500, help="entities per pulled page")
    ap.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    args = ap.parse_args()
    env = services()
    n = args.entities
    db = fresh_db(env["DX_DATABASE_URL"], "bench_inbound")
    prefix = f"bench-inbound-{int(time.time())}"
    admin = AdminClient({"bootstrap.servers": env["DX_KAFKA_BOOTSTRAP"]})
    for fut in admin.create_topics([NewTopic(f"{prefix}.{t}", 2, 1)
                                    for t in ("p_hook", "p_pull")]).values():
        fut.result(30)
    with psycopg.connect(db) as conn:
        conn.execute(TABLES)
    pim, pim_server = catalog(n)
    os.environ["BENCH_HOOK_SECRET"] = SECRET
    results: dict[str, tuple[float, float, float]] = {}  # scenario -> (req/s, acked/s, db/s)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "dx.yaml"
            cfg.write_text(config(db, env, prefix, pim, args.page))
            config_ = load_config(cfg)

            # webhook: warm the worker with one entity, then the clock
            procs.append(worker(cfg, "p_hook"))
            hooks = WebhookServer(config_)
            url, server = serve(hooks.app)
            warm = json.dumps([entity(0)]).encode()
            post_batches(url, "/inbound/p_hook", [warm], 1, signed)
            wait_rows(db, "p_hook", 1)
            reqs = bodies(n, args.batch, 0, wrap=False)
            start = time.perf_counter()
            took = post_batches(url, "/inbound/p_hook", reqs, args.clients, signed)
            done = wait_rows(db, "p_hook", n + 1)
            results["webhook"] = (len(reqs) / took, n / took, n / (done - start))
            server.should_exit = True
            hooks.close()

            # pull
            procs.append(worker(cfg, "p_pull"))
            time.sleep(3)  # the worker's start, outside the clock
            puller = Puller(config_, "p_pull")
            start = time.perf_counter()
            stats = puller.run(once=True)
            took = time.perf_counter() - start
            puller.close()
            done = wait_rows(db, "p_pull", n)
            results["pull"] = (stats.requests / took, stats.entities / took, n / (done - start))

            # baseline: the Data Exchange API's batch POST of the same rows
            api = create_app(cfg, env={**os.environ, "BENCH_API_KEY": API_KEY})
            api_url, api_server = serve(api.app)
            reqs = bodies(n, args.batch, 0, wrap=True)
            start = time.perf_counter()
            took = post_batches(api_url, "/products", reqs, args.clients,
                                lambda b: {"X-Api-Key": API_KEY,
                                           "Content-Type": "application/json"})
            assert count(db, "p_api") == n
            results["api batch POST"] = (len(reqs) / took, n / took, n / took)
            api_server.should_exit = True
            api.close()
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
        pim_server.shutdown()
        time.sleep(0.5)
        with psycopg.connect(env["DX_DATABASE_URL"], autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db.rsplit("/", 1)[1]}" WITH (FORCE)')
    print(f"Inbound into PostgreSQL, {n:,} entities per scenario, {os.cpu_count()} CPUs, "
          f"{args.clients} clients, {args.batch} entities per request, pages of {args.page}")
    print(f"  {'scenario':<18}{'requests/s':>12}{'entities/s acked':>18}{'entities/s in DB':>18}")
    for name, (rps, acked, in_db) in results.items():
        print(f"  {name:<18}{rps:>12,.0f}{acked:>18,.0f}{in_db:>18,.0f}")


if __name__ == "__main__":
    main()
