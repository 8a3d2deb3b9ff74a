"""Console benchmark: the task list and the task page with many tasks in ``dx.task`` (1,000,000
by default), p50/p99 response time of the real console (uvicorn in this process, logged in,
one keep-alive client, sequential requests after a warm-up).

    python bench/console.py                     # services from DX_* env vars or deploy/local/stack
    python bench/console.py --quick             # fewer requests: about 3 minutes
    python bench/console.py --tasks 200000 --requests 100

The filled database (``bench_console_<tasks>``) is kept and reused by the next run with the same
``--tasks`` (``--refill`` rebuilds it): the fill is one generate_series INSERT per part.

Tasks: 10 routes; 90% succeeded, 5% skipped, 1% each failed, retrying and pending spread over
time, and 2% dead, all among the oldest tasks (a backlog nobody handled: the case where reading
the newest tasks first and filtering is slowest).

Each scenario runs twice in the same database: first without the indexes the console's pages
rely on (INDEXES, fewer requests: a scan of a million rows per request), then with them, rebuilt
by the task store's own upgrade path (ensure_schema: CREATE INDEX CONCURRENTLY) — side by side,
so the figure the README quotes shows what the indexes buy. "dashboard task counts" times the
dashboard's task queries in-process (counts by route and status, failure rate, last errors)
against the GROUP BY over every task they replaced.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_stack import services  # noqa: E402

from pipeline.config.loader import load_config  # noqa: E402
from pipeline.console import accounts  # noqa: E402
from pipeline.console.app import build_app  # noqa: E402
from pipeline.console.dashboard import route_health  # noqa: E402
from pipeline.console.schema import ensure_schema as console_schema  # noqa: E402
from pipeline.routes.pause import ensure_schema as pause_schema  # noqa: E402
from pipeline.tasks.query import counts  # noqa: E402
from pipeline.tasks.store import INDEXES as TASK_INDEXES  # noqa: E402
from pipeline.tasks.store import ensure_schema as tasks_schema  # noqa: E402

ROUTES = 10
#: The task store's indexes for people's reads (dropped for the baseline; the others serve the
#: workers).
INDEXES = ("task_route_status_id_idx", "task_status_id_idx", "task_key_id_idx",
           "task_key_values_idx")
assert set(INDEXES) <= set(TASK_INDEXES)

FILL = (  # the dead backlog first: the oldest ids
    """INSERT INTO dx.task (route, topic, partition, "offset", key, event_id, op, status, attempts,
                     error, import_log, created_at, updated_at)
SELECT 'route-' || (i %% %(routes)s), 'shop.public.products', i %% 6, i, '{"id": ' || i || '}',
       md5(i::text), 'u', 'dead', 5, 'HTTP 503 timeout after 5 attempts',
       jsonb_build_object('mapped', jsonb_build_object('id', i, 'name', 'product ' || i)),
       now() - interval '30 days', now() - interval '30 days'
FROM generate_series(1, %(n)s / 50) i
""",
    """
INSERT INTO dx.task (route, topic, partition, "offset", key, event_id, op, status, attempts,
                     error, import_log, export_log, created_at, updated_at)
SELECT 'route-' || ((i / 100) %% %(routes)s), 'shop.public.products', i %% 6, i,
       '{"id": ' || i || '}',
       md5(i::text), 'u', s.status, CASE WHEN s.status = 'succeeded' THEN 1 ELSE 3 END,
       CASE WHEN s.status IN ('dead', 'failed', 'retrying')
            THEN 'HTTP ' || (ARRAY['500 Internal Server Error', '400 unknown category',
                                   '503 timeout'])[1 + i %% 3] END,
       CASE WHEN s.status <> 'succeeded' THEN jsonb_build_object(
            'mapped', jsonb_build_object('id', i, 'name', 'product ' || i)) END,
       CASE WHEN s.status <> 'succeeded' THEN jsonb_build_object('status', 500) END,
       now() - make_interval(secs => (%(n)s - i) * 0.5),
       now() - make_interval(secs => (%(n)s - i) * 0.5)
FROM generate_series(1, %(n)s) i,
     LATERAL (SELECT CASE WHEN i %% 100 < 90 THEN 'succeeded' WHEN i %% 100 < 95 THEN 'skipped'
                          WHEN i %% 100 < 97 THEN 'failed' WHEN i %% 100 < 98 THEN 'retrying'
                          ELSE 'pending' END AS status) s
WHERE i > %(n)s / 50
""",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, env: dict[str, str], url: str) -> Path:
    sinks = "\n".join(f"  - name: route-{i}\n    topics: [bench.t{i}]\n"
                      f"    connector: {{type: http, url: 'http://127.0.0.1:9/x'}}"
                      for i in range(ROUTES))
    path.write_text(f"""
database:
  url: {url}
kafka:
  bootstrap_servers: {env['DX_KAFKA_BOOTSTRAP']}
  topic_prefix: bench
schema_registry:
  url: {env['DX_SCHEMA_REGISTRY_URL']}
sinks:
{sinks}
""")
    return path


def database(admin_url: str, n: int, refill: bool) -> str:
    """The URL of ``bench_console_<n>``, filled with ``n`` tasks (kept from an earlier run when
    it finished filling)."""
    name = f"bench_console_{n}"
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                              (name,)).fetchone()
        if exists and not refill:
            with psycopg.connect(url, autocommit=True) as db:
                done = db.execute("SELECT obj_description('dx.task'::regclass)").fetchone()
            if done and done[0] == f"bench filled {n}":
                print(f"  reusing {name} ({n:,} tasks)", flush=True)
                return url
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    fill(url, n)
    return url


def fill(url: str, n: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for ensure in (tasks_schema, pause_schema, console_schema):
            ensure(conn)
        t = time.perf_counter()
        for name in TASK_INDEXES:  # one index build after the fill beats a million inserts
            conn.execute(f"DROP INDEX dx.{name}")
        for statement in FILL:
            conn.execute(statement, {"n": n, "routes": ROUTES})
        tasks_schema(conn, build_indexes=True)  # concurrently: the table exists
        conn.execute("VACUUM ANALYZE dx.task")
        accounts.add_user(conn, "bench", "operator", "bench-password")
        conn.execute(f"COMMENT ON TABLE dx.task IS 'bench filled {n}'")
        print(f"  {n:,} tasks written and indexed in {time.perf_counter() - t:.0f}s",
              flush=True)


def log_in(http: httpx.Client) -> None:
    page = http.get("/login").text
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token is not None
    r = http.post("/login", data={"csrf": token.group(1), "name": "bench",
                                  "password": "bench-password", "next": "/"})
    assert r.status_code == 303, r.text


def measure(http: httpx.Client, paths: list[str], n: int) -> tuple[float, float]:
    for p in paths[:min(5, max(1, n // 10))]:  # warm-up
        http.get(p)
    times = []
    for i in range(n):
        path = paths[i % len(paths)]
        t = time.perf_counter()
        r = http.get(path)
        times.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def scenarios(url: str) -> dict[str, list[str]]:
    with psycopg.connect(url) as conn:
        ids = [int(r[0]) for r in conn.execute(
            "SELECT id FROM dx.task TABLESAMPLE SYSTEM (1) LIMIT 200")]
        cursor = conn.execute(
            "SELECT id FROM dx.task WHERE route = 'route-3' AND status = 'dead' "
            "ORDER BY id DESC OFFSET 1000 LIMIT 1").fetchone()
    random.Random(1).shuffle(ids)
    deep = cursor[0] if cursor else 0
    return {
        "list, no filter": ["/tasks"],
        "list status=dead": ["/tasks?status=dead"],
        "list status=failed+retrying": ["/tasks?status=failed&status=retrying"],
        "list key": [f"/tasks?key=%7B%22id%22%3A%20{i}%7D" for i in (5, 5000, 500000)],
        "list route + status=dead": [f"/tasks?route=route-{i}&status=dead"
                                     for i in range(ROUTES)],
        "list route + succeeded": [f"/tasks?route=route-{i}&status=succeeded"
                                   for i in range(ROUTES)],
        "list route + dead, page 21": [f"/tasks?route=route-3&status=dead&before={deep}"],
        "list route + dead + text": ["/tasks?route=route-3&status=dead&text=timeout"],
        "list failed + since 2h": ["/tasks?status=failed&since=2h"],
        "task page": [f"/tasks/{i}" for i in ids],
    }


def run(url: str, cfg: Path, n: int) -> dict[str, tuple[float, float]]:
    app = build_app(load_config(cfg))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    out: dict[str, tuple[float, float]] = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
            log_in(http)
            for name, paths in scenarios(url).items():
                out[name] = measure(http, paths, n)
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.pool.close()
    return out


def set_indexes(url: str, present: bool) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        if present:
            t = time.perf_counter()
            tasks_schema(conn, build_indexes=True)  # what 'dx init' does after an upgrade
            print(f"  {len(INDEXES)} indexes built concurrently in "
                  f"{time.perf_counter() - t:.0f}s", flush=True)
        else:
            for name in INDEXES:
                conn.execute(f"DROP INDEX IF EXISTS dx.{name}")
        conn.execute("ANALYZE dx.task")


def dashboard_counts(url: str, n: int, before: bool) -> tuple[float, float]:
    """The dashboard's task queries, in-process (``before``: the full GROUP BY they replaced)."""
    times = []
    with psycopg.connect(url, autocommit=True) as conn:
        names = [f"route-{i}" for i in range(ROUTES)]
        for i in range(n + 2):
            t = time.perf_counter()
            if before:
                conn.execute("SELECT route, status, count(*) FROM dx.task "
                             "GROUP BY route, status").fetchall()
            else:
                counts(conn)
            route_health(conn, names)
            if i >= 2:  # warm-up
                times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=200, help="per scenario")
    ap.add_argument("--baseline-requests", type=int, default=20,
                    help="per scenario without the indexes (each may scan every task)")
    ap.add_argument("--quick", action="store_true",
                    help="100 requests per scenario, 2 without the indexes")
    ap.add_argument("--refill", action="store_true", help="rebuild the kept database")
    ap.add_argument("--drop", action="store_true", help="drop the database at the end")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.baseline_requests = 100, 2
    env = services()
    import tempfile

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"console task pages, {args.tasks:,} tasks, {ROUTES} routes, {os.cpu_count()} "
              f"CPUs, load average {os.getloadavg()[0]:.2f}, {args.requests} sequential "
              f"requests per scenario ({args.baseline_requests} without the indexes)",
              flush=True)
        url = database(env["DX_DATABASE_URL"], args.tasks, args.refill)
        cfg = write_config(Path(tmp) / "dx.yaml", env, url)
        set_indexes(url, False)
        base = run(url, cfg, args.baseline_requests)
        base["dashboard task counts"] = dashboard_counts(url, args.baseline_requests, True)
        set_indexes(url, True)
        tuned = run(url, cfg, args.requests)
        tuned["dashboard task counts"] = dashboard_counts(url, args.requests, False)
    print(f"  {'scenario':<30}{'p50 ms':>9}{'p99 ms':>9}   {'without INDEXES':>18}")
    print(f"  {'':<30}{'':>9}{'':>9}   {'p50 ms':>9}{'p99 ms':>9}")
    for name, (p50, p99) in tuned.items():
        b50, b99 = base[name]
        print(f"  {name:<30}{p50:>9.1f}{p99:>9.1f}   {b50:>9.1f}{b99:>9.1f}")
    print(f"  load average {os.getloadavg()[0]:.2f} at the end; "
          f"{time.perf_counter() - started:.0f}s in all", flush=True)
    if args.drop:
        with psycopg.connect(env["DX_DATABASE_URL"], autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


if __name__ == "__main__":
    main()
