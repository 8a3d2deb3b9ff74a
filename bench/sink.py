"""Sink throughput under failure and slowness, and per-task overhead, against a bare
consume-and-POST loop, in one run.

    eval "$(deploy/local/stack env)"; python bench/sink.py [--events 3000] [--keys 300]

Prints events/s for: the bare loop (confluent_kafka consumer + httpx POST per message, no
decode, no task log) and the dx sink worker at concurrency 1 against a healthy target; the
worker at concurrency 8 against a healthy target, against one that fails 10% of first attempts
transiently (500/503/429), and against one that takes 20 ms per request at concurrency 1 and 8;
the dx sink worker to PostgreSQL; and the per-task overhead (ms, p50/p99) from the moment a
message is consumed to the moment it is handed to the target, with events trickled below
capacity, beside the same span of the bare loop: both measured from the produce call to the
request's arrival at the target (the target's clock: the same machine), so Kafka's own latency
is in both and the difference is dx's. (The bare loop's own consume -> send span is two
consecutive statements: it used to be printed as that, 0.00.) The HTTP target is a separate
process (keep-alive), so it does not share our GIL.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import sys
import tempfile
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import psycopg
from bench_stack import fresh_db, services
from confluent_kafka import Consumer

from pipeline.config.loader import load_config
from pipeline.sink.worker import SinkWorker
from tests.integration.test_sink_support import (
    EventProducer,
    create_topic,
    write_config,
)


class Stack:
    def __init__(self, env: dict[str, str]) -> None:
        self.database_url = env["DX_DATABASE_URL"]
        self.kafka_bootstrap = env["DX_KAFKA_BOOTSTRAP"]
        self.schema_registry_url = env["DX_SCHEMA_REGISTRY_URL"]


def serve(port_q: Any, arrivals: Any) -> None:
    """/ok: 200; /flaky: 10% of events fail their first attempt; /slow: 20 ms per request;
    /lat: 200, and (Idempotency-Key, arrival wall-clock time) put on ``arrivals``."""
    seen: set[str] = set()
    lock = threading.Lock()

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else delayed ACKs cap keep-alive at 25 req/s

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status = 200
            if self.path.startswith("/flaky"):
                idem = self.headers.get("Idempotency-Key") or ""
                with lock:
                    first = idem not in seen
                    seen.add(idem)
                if first and zlib.crc32(idem.encode()) % 10 == 0:
                    status = (500, 503, 429)[zlib.crc32(idem.encode()) % 3]
            elif self.path.startswith("/slow"):
                time.sleep(0.02)
            elif self.path.startswith("/lat"):
                arrivals.put((self.headers.get("Idempotency-Key") or "", time.time()))
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0")
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


def baseline(stack: Stack, topic: str, url: str, n: int) -> float:
    """Events/s of the bare loop: consume, POST each message, nothing else."""
    c = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": str(uuid.uuid4()),
                  "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    client = httpx.Client()
    got, t0 = 0, 0.0
    while got < n:
        for m in c.consume(500, 0.5):
            if m.error():
                continue
            if not t0:
                t0 = time.perf_counter()
            client.post(url, content=m.value(), headers={"Idempotency-Key": str(got)})
            got += 1
    elapsed = time.perf_counter() - t0
    c.close()
    client.close()
    return (n - 1) / elapsed


def run_worker(cfg: Path, route: str, n: int) -> tuple[float, list[float]]:
    """Events/s from the first delivery to the ``n``-th (the backlog is in the topic)."""
    w = SinkWorker(load_config(cfg), route, keep_overheads=True)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    while not w.stats.counts.get("succeeded"):
        time.sleep(0.002)
        if not t.is_alive():
            raise SystemExit(f"worker {route} stopped early")
    t0, c0 = time.perf_counter(), w.stats.counts.get("succeeded", 0)
    while w.stats.counts.get("succeeded", 0) < n:
        time.sleep(0.002)
        if not t.is_alive():
            raise SystemExit(f"worker {route} stopped early: {w.stats.counts}")
    elapsed = time.perf_counter() - t0
    w.stop.set()
    t.join(60)
    return (w.stats.counts.get("succeeded", 0) - c0) / elapsed, w.overheads


def trickle(prod: EventProducer, n: int, rate: float, keys: int) -> dict[str, float]:
    """Produce ``n`` events at ``rate``/s, so latency is measured without a queue in front;
    event id -> wall-clock time of its produce call."""
    produced: dict[str, float] = {}
    start = time.perf_counter()
    for i in range(n):
        at = time.time()
        produced[prod.send(i % keys, seq=i)["event_id"]] = at
        prod.producer.flush(1)
        delay = start + (i + 1) / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    return produced


def produce_to_target(produced: dict[str, float], arrivals: Any) -> list[float]:
    """Seconds from each event's produce call to its first arrival at the target."""
    first: dict[str, float] = {}
    deadline = time.monotonic() + 30
    while len(first) < len(produced) and time.monotonic() < deadline:
        try:
            idem, at = arrivals.get(timeout=1)
        except queue.Empty:
            continue
        if idem in produced:
            first.setdefault(idem, at)
    return [at - produced[idem] for idem, at in first.items()]


def latency_worker(cfg: Path, route: str, prod: EventProducer, n: int, rate: float,
                   keys: int, arrivals: Any) -> tuple[list[float], list[float]]:
    """dx's consume -> send overheads, and its produce -> target latencies."""
    w = SinkWorker(load_config(cfg), route, keep_overheads=True)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    w.assigned.wait(60)
    time.sleep(1)
    produced = trickle(prod, n, rate, keys)
    while w.stats.counts.get("succeeded", 0) < n:
        time.sleep(0.01)
    w.stop.set()
    t.join(60)
    return w.overheads, produce_to_target(produced, arrivals)


def latency_baseline(stack: Stack, topic: str, url: str, prod: EventProducer, n: int,
                     rate: float, keys: int, arrivals: Any) -> list[float]:
    """The bare loop's produce -> target latency with the same trickle (poll(0.1) returns a
    message as soon as it arrives; it POSTs it at once, with its event id)."""
    done = threading.Event()

    def loop() -> None:
        c = Consumer({"bootstrap.servers": stack.kafka_bootstrap,
                      "group.id": str(uuid.uuid4()), "auto.offset.reset": "earliest"})
        c.subscribe([topic])
        client = httpx.Client()
        got = 0
        while got < n:
            m = c.poll(0.1)
            if m is None or m.error():
                continue
            event_id = dict(m.headers() or []).get("dx.event_id") or b""
            if isinstance(event_id, bytes):
                event_id = event_id.decode()
            client.post(url, content=m.value(), headers={"Idempotency-Key": event_id})
            got += 1
        c.close()
        done.set()

    threading.Thread(target=loop, daemon=True).start()
    time.sleep(2)
    produced = trickle(prod, n, rate, keys)
    done.wait(120)
    return produce_to_target(produced, arrivals)


def route(name: str, topic: str, url: str, concurrency: int, extra: str = "") -> str:
    return f"""
  - name: {name}
    topics: [{topic}]
    concurrency: {concurrency}
    retry: {{backoff_base_s: 0.1}}
    connector: {{type: http, url: "{url}", max_connections: 32}}
{extra}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--keys", type=int, default=300)
    ap.add_argument("--slow-events", type=int, default=150,
                    help="events measured per concurrency unit against the 20 ms target")
    ap.add_argument("--latency-events", type=int, default=400)
    ap.add_argument("--latency-rate", type=float, default=200, help="events/s while measuring")
    args = ap.parse_args()
    n = args.events
    stack = Stack(services())

    q: Any = multiprocessing.Queue()
    arrivals: Any = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(q, arrivals), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{q.get(timeout=10)}"

    db_url = fresh_db(stack.database_url)
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("CREATE TABLE products (id int PRIMARY KEY, name text, behaviour text, "
                  "seq int, price numeric(10,2))")
    prefix = "bench" + uuid.uuid4().hex[:6]
    topic = f"{prefix}.public.products"
    results: dict[str, float] = {}
    try:
        create_topic(stack, topic, partitions=3)
        prod = EventProducer(stack, topic, prefix)
        for i in range(n):
            prod.send(i % args.keys, seq=i // args.keys)
        prod.flush()
        tmp = Path(tempfile.mkdtemp())
        item = "{$key.id}"
        cfg = write_config(tmp / "dx.yaml", stack, db_url, prefix, "".join([
            route("http-c1", topic, f"{url}/ok/{item}", 1),
            route("http-c8", topic, f"{url}/ok/{item}", 8),
            route("flaky-c8", topic, f"{url}/flaky/{item}", 8,
                  "    breaker: {failures: 1000}\n"),
            route("slow-c1", topic, f"{url}/slow/{item}", 1),
            route("slow-c8", topic, f"{url}/slow/{item}", 8),
            route("lat", f"{topic}.lat", f"{url}/lat/{item}", 8),
            f"""
  - name: pg
    topics: [{topic}]
    concurrency: 8
    batch_size: 500
    connector: {{type: postgres, url: "{db_url}", table: products}}
"""]))
        results["bare"] = baseline(stack, topic, url + "/ok/bare", n)
        results["http-c1"], _ = run_worker(cfg, "http-c1", n)
        results["http-c8"], _ = run_worker(cfg, "http-c8", n)
        results["flaky-c8"], _ = run_worker(cfg, "flaky-c8", n)
        results["slow-c1"], _ = run_worker(cfg, "slow-c1", args.slow_events)
        results["slow-c8"], _ = run_worker(cfg, "slow-c8", min(n, 8 * args.slow_events))
        results["pg"], _ = run_worker(cfg, "pg", n)
        # latency: a trickle below capacity, so consume->send is overhead, not queueing
        create_topic(stack, f"{topic}.lat", partitions=3)
        create_topic(stack, f"{topic}.latbase", partitions=3)
        ln, lr = args.latency_events, args.latency_rate
        over_dx, lat_dx = latency_worker(
            cfg, "lat", EventProducer(stack, f"{topic}.lat", prefix), ln, lr, args.keys,
            arrivals)
        lat_base = latency_baseline(stack, f"{topic}.latbase", url + "/lat/bare",
                                    EventProducer(stack, f"{topic}.latbase", prefix), ln, lr,
                                    args.keys, arrivals)
    finally:
        server.terminate()
        with psycopg.connect(stack.database_url, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {db_url.rsplit('/', 1)[1]} WITH (FORCE)")

    r = results
    print(f"\nthroughput: {n} events already in the topic, {args.keys} keys, 3 partitions, "
          f"{os.cpu_count()} CPUs")
    print(f"{'path':<62} {'events/s':>9} {'ratio':>7}")
    rows = [
        ("bare consume+POST loop (baseline)", r["bare"], ""),
        ("dx -> HTTP, healthy, concurrency 1", r["http-c1"],
         f"{r['http-c1'] / r['bare']:.2f}x bare"),
        ("dx -> HTTP, healthy, concurrency 8", r["http-c8"], ""),
        ("dx -> HTTP, 10% transient failures, concurrency 8", r["flaky-c8"],
         f"{r['flaky-c8'] / r['http-c8']:.2f}x healthy"),
        ("dx -> HTTP, 20 ms target, concurrency 1", r["slow-c1"], ""),
        ("dx -> HTTP, 20 ms target, concurrency 8", r["slow-c8"],
         f"{r['slow-c8'] / r['slow-c1']:.2f}x c1"),
        ("dx -> PostgreSQL, concurrency 8, batch 500", r["pg"], ""),
    ]
    for name, rate, ratio in rows:
        print(f"{name:<62} {rate:>9.0f} {ratio:>7}")
    print(f"\nlatency, produce -> request at the target (ms), {ln} events trickled at "
          f"{lr:g}/s")
    print(f"{'path':<62} {'p50':>8} {'p99':>8}")
    for name, over in [("bare consume+POST loop (baseline)", lat_base),
                       ("dx -> HTTP (decode, filter, map, lane, task log)", lat_dx)]:
        print(f"{name:<62} {pct(over, 0.5):>8.2f} {pct(over, 0.99):>8.2f}")
    print(f"{'  of which dx consume -> send':<62} {pct(over_dx, 0.5):>8.2f} "
          f"{pct(over_dx, 0.99):>8.2f}")
    print(json.dumps({"events": n, **{f"{k}_eps": round(v) for k, v in r.items()},
                      "latency_ms_p50": round(pct(lat_dx, 0.5), 2),
                      "latency_ms_p99": round(pct(lat_dx, 0.99), 2),
                      "baseline_latency_ms_p50": round(pct(lat_base, 0.5), 2),
                      "baseline_latency_ms_p99": round(pct(lat_base, 0.99), 2),
                      "overhead_ms_p50": round(pct(over_dx, 0.5), 2),
                      "overhead_ms_p99": round(pct(over_dx, 0.99), 2)}))


if __name__ == "__main__":
    main()
