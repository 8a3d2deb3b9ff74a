"""Sink throughput and per-task overhead, against a bare consume-and-POST loop, in one run.

    eval "$(deploy/local/stack env)"; python bench/sink.py [--events 5000] [--keys 200]

Prints events/s for: a bare loop (confluent_kafka consumer + httpx POST per message, no decode,
no task log, no offsets beyond auto-commit), the dx sink worker to the same HTTP target, and the
dx sink worker to PostgreSQL (postgres connector, batched upserts); plus the per-task overhead
(ms, p50/p99) from the moment a message is consumed to the moment it is handed to the target.
The HTTP target is a separate process (http.server, keep-alive), so it does not share our GIL.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import psycopg
from confluent_kafka import Consumer

from pipeline.config.loader import load_config
from pipeline.sink.worker import SinkWorker
from tests.integration.test_sink_support import (
    EventProducer,
    create_topic,
    write_config,
)


class Stack:
    database_url = os.environ.get("DX_DATABASE_URL", "postgresql://shop:shop@127.0.0.1:55432/dx")
    kafka_bootstrap = os.environ.get("DX_KAFKA_BOOTSTRAP", "127.0.0.1:59092")
    schema_registry_url = os.environ.get("DX_SCHEMA_REGISTRY_URL",
                                         "http://127.0.0.1:58081/apis/ccompat/v7")


def serve(port_q: Any) -> None:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else delayed ACKs cap keep-alive at 25 req/s

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_PUT = do_POST

        def log_message(self, *a: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    httpd.daemon_threads = True
    port_q.put(httpd.server_address[1])
    httpd.serve_forever()


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))] * 1000


def baseline(topic: str, url: str, n: int) -> tuple[float, list[float]]:
    c = Consumer({"bootstrap.servers": Stack.kafka_bootstrap, "group.id": str(uuid.uuid4()),
                  "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    client = httpx.Client()
    got, t0, overheads = 0, 0.0, []
    while got < n:
        for m in c.consume(500, 0.5):
            if m.error():
                continue
            consumed = time.perf_counter()
            if not t0:
                t0 = consumed
            overheads.append(time.perf_counter() - consumed)
            client.post(url, content=m.value(), headers={"Idempotency-Key": str(got)})
            got += 1
    elapsed = time.perf_counter() - t0
    c.close()
    client.close()
    return n / elapsed, overheads


def run_worker(cfg: Path, route: str, n: int) -> tuple[float, list[float]]:
    w = SinkWorker(load_config(cfg), route, keep_overheads=True)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    while not w.stats.counts.get("succeeded"):
        time.sleep(0.005)
    t0, c0 = time.perf_counter(), w.stats.counts.get("succeeded", 0)
    while w.stats.counts.get("succeeded", 0) < n:
        time.sleep(0.005)
        if not t.is_alive():
            raise SystemExit(f"worker stopped early: {w.stats.counts}")
    elapsed = time.perf_counter() - t0
    w.stop.set()
    t.join(60)
    return (n - c0) / elapsed, w.overheads


def trickle(prod: EventProducer, n: int, rate: float, keys: int) -> None:
    """Produce ``n`` events at ``rate``/s, so latency is measured without a queue in front."""
    start = time.perf_counter()
    for i in range(n):
        prod.send(i % keys, seq=i)
        prod.producer.flush(1)
        delay = start + (i + 1) / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def latency_worker(cfg: Path, route: str, prod: EventProducer, n: int, rate: float,
                   keys: int) -> list[float]:
    w = SinkWorker(load_config(cfg), route, keep_overheads=True)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    w.assigned.wait(60)
    time.sleep(1)
    trickle(prod, n, rate, keys)
    while w.stats.counts.get("succeeded", 0) < n:
        time.sleep(0.01)
    w.stop.set()
    t.join(60)
    return w.overheads


def latency_baseline(topic: str, url: str, prod: EventProducer, n: int, rate: float,
                     keys: int) -> list[float]:
    out: list[float] = []
    done = threading.Event()

    def loop() -> None:
        c = Consumer({"bootstrap.servers": Stack.kafka_bootstrap, "group.id": str(uuid.uuid4()),
                      "auto.offset.reset": "earliest"})
        c.subscribe([topic])
        client = httpx.Client()
        while len(out) < n:
            for m in c.consume(100, 0.1):
                if m.error():
                    continue
                consumed = time.perf_counter()
                out.append(time.perf_counter() - consumed)
                client.post(url, content=m.value())
        c.close()
        done.set()

    threading.Thread(target=loop, daemon=True).start()
    time.sleep(2)
    trickle(prod, n, rate, keys)
    done.wait(120)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--keys", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--latency-events", type=int, default=400)
    ap.add_argument("--latency-rate", type=float, default=200, help="events/s while measuring")
    args = ap.parse_args()
    n = args.events

    q: Any = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(q,), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{q.get(timeout=10)}"

    db = "bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(Stack.database_url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {db}")
    db_url = Stack.database_url.rsplit("/", 1)[0] + "/" + db
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("CREATE TABLE products (id int PRIMARY KEY, name text, behaviour text, "
                  "seq int, price numeric(10,2))")
    prefix = "bench" + uuid.uuid4().hex[:6]
    topic = f"{prefix}.public.products"
    try:
        create_topic(Stack, topic, partitions=3)
        prod = EventProducer(Stack, topic, prefix)
        for i in range(n):
            prod.send(i % args.keys, seq=i // args.keys)
        prod.flush()
        tmp = Path(tempfile.mkdtemp())
        cfg = write_config(tmp / "dx.yaml", Stack, db_url, prefix, f"""
  - name: bench-http
    topics: [{topic}]
    concurrency: {args.concurrency}
    connector: {{type: http, url: "{url}/products/{{$key.id}}", max_connections: 32}}
  - name: bench-lat
    topics: [{topic}.lat]
    concurrency: {args.concurrency}
    connector: {{type: http, url: "{url}/products/{{$key.id}}", max_connections: 32}}
  - name: bench-pg
    topics: [{topic}]
    concurrency: {args.concurrency}
    batch_size: 500
    connector: {{type: postgres, url: "{db_url}", table: products}}
""")
        base_rate, _ = baseline(topic, url + "/bare", n)
        http_rate, http_over = run_worker(cfg, "bench-http", n)
        pg_rate, pg_over = run_worker(cfg, "bench-pg", n)
        # latency: a trickle below capacity, so consume->send is overhead, not queueing
        create_topic(Stack, f"{topic}.lat", partitions=3)
        create_topic(Stack, f"{topic}.latbase", partitions=3)
        ln, lr = args.latency_events, args.latency_rate
        lat_dx = latency_worker(cfg, "bench-lat", EventProducer(Stack, f"{topic}.lat", prefix),
                                ln, lr, args.keys)
        lat_base = latency_baseline(f"{topic}.latbase", url + "/bare",
                                    EventProducer(Stack, f"{topic}.latbase", prefix), ln, lr,
                                    args.keys)
    finally:
        server.terminate()
        with psycopg.connect(Stack.database_url, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")

    print(f"\nthroughput: {n} events already in the topic, {args.keys} keys, 3 partitions, "
          f"{os.cpu_count()} CPUs")
    print(f"{'path':<58} {'events/s':>10}")
    for name, rate in [("bare consume+POST loop (baseline)", base_rate),
                       (f"dx sink -> HTTP (concurrency {args.concurrency})", http_rate),
                       (f"dx sink -> PostgreSQL (concurrency {args.concurrency}, batch 500)",
                        pg_rate)]:
        print(f"{name:<58} {rate:>10.0f}")
    print(f"\nper-task overhead, consume -> send (ms), {ln} events trickled at {lr:g}/s")
    print(f"{'path':<58} {'p50':>8} {'p99':>8}")
    for name, over in [("bare consume+POST loop (baseline)", lat_base),
                       ("dx sink -> HTTP (decode, filter, map, lane, task log)", lat_dx)]:
        print(f"{name:<58} {pct(over, 0.5):>8.2f} {pct(over, 0.99):>8.2f}")
    print(json.dumps({"events": n, "baseline_eps": round(base_rate),
                      "http_eps": round(http_rate), "postgres_eps": round(pg_rate),
                      "overhead_ms_p50": round(pct(lat_dx, 0.5), 2),
                      "overhead_ms_p99": round(pct(lat_dx, 0.99), 2),
                      "baseline_overhead_ms_p50": round(pct(lat_base, 0.5), 3),
                      "baseline_overhead_ms_p99": round(pct(lat_base, 0.99), 3),
                      "backlog_overhead_ms_p50": round(pct(http_over, 0.5), 1),
                      "postgres_backlog_overhead_ms_p50": round(pct(pg_over, 0.5), 1)}))


if __name__ == "__main__":
    main()
