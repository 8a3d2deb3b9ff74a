"""Capture and relay benchmark: prints write overhead, relay throughput and commit-to-Kafka
latency, each beside its baseline measured in the same run.

    python bench/capture_relay.py            # services from DX_* env vars or deploy/local/stack
    python bench/capture_relay.py --quick    # smaller run

Write throughput is measured with pgbench (C client, so the driver does not hide trigger cost):
no capture (baseline) vs row trigger vs statement trigger vs logical capture vs application
outbox, for single-row and 500-row UPDATE transactions. Relay figures for logical and trigger
capture. Relay throughput: draining a backlog (events/s from the first read to the last commit; the
start-up before it printed apart), and while writers run, each with the relay's CPU time per
event;
baseline is a bare producer sending the same number of pre-encoded records (no database).
Latency: writers at a fixed rate; a read_committed consumer measures receive time minus the
commit timestamp carried in ``source.ts_ms``. Then Debezium on Kafka Connect
(bench/debezium_peer.py, same stack, same table and writes; ``--no-debezium`` skips it) and a
side-by-side table of dx logical, dx trigger and Debezium with the ratios dx/Debezium.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_stack import fresh_db as new_db  # noqa: E402
from bench_stack import services  # noqa: E402

from pipeline.config.loader import load_config  # noqa: E402
from pipeline.events.topics import TopicSpec, ensure_topics  # noqa: E402
from pipeline.relay.runner import Relay  # noqa: E402

ROWS = 10_000
#: databases this run created: dropped at the end, with their replication slots (a slot left
#: behind keeps WAL and takes one of the server's max_replication_slots)
CREATED: list[str] = []


def fresh_db(admin_url: str) -> str:
    url = new_db(admin_url)
    CREATED.append(url)
    return url


def drop_created(admin_url: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for url in CREATED:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(url.rsplit("/", 1)[1])))


def write_config(tmp: Path, env: dict[str, str], db: str, prefix: str, mode: str,
                 capture: str) -> Path:
    path = tmp / f"{prefix}.yaml"
    path.write_text(f"""
database: {{url: "{db}"}}
kafka: {{bootstrap_servers: "{env['DX_KAFKA_BOOTSTRAP']}", topic_prefix: {prefix}}}
schema_registry: {{url: "{env['DX_SCHEMA_REGISTRY_URL']}"}}
relay: {{name: {prefix}, mode: {mode}, batch_size: 5000, poll_interval_s: 0.01}}
capture: {{mode: {capture}}}
tables:
  - name: items
    columns: [id, sku, price, qty, updated_at]
""")
    return path


def dx(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pipeline.cli", *args], check=True,
                   stdout=subprocess.DEVNULL)


def setup_table(db: str, rows: int) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS items")
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, sku text NOT NULL, "
                     "price numeric(10,2) NOT NULL, qty int NOT NULL, "
                     "updated_at timestamptz NOT NULL DEFAULT now(), note text)")
        conn.execute("INSERT INTO items (id, sku, price, qty) "
                     "SELECT g, 'sku-' || g, g %% 100, 0 FROM generate_series(1, %s) g", (rows,))
        conn.execute("VACUUM ANALYZE items")


def pgbench(db: str, script: str, seconds: int, clients: int = 2) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    out = subprocess.run(["pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j",
                          str(clients), "-T", str(seconds), "-f", f.name, db],
                         capture_output=True, text=True)
    os.unlink(f.name)
    m = re.search(r"tps = ([\d.]+)", out.stdout)
    if not m:
        raise RuntimeError(out.stderr or out.stdout)
    return float(m.group(1))


SINGLE = f"\\set id random(1, {ROWS})\nUPDATE items SET qty = qty + 1 WHERE id = :id;\n"
BULK = (f"\\set id random(1, {ROWS - 500})\n"
        "UPDATE items SET qty = qty + 1 WHERE id BETWEEN :id AND :id + 499;\n")
OUTBOX_SINGLE = (f"\\set id random(1, {ROWS})\nBEGIN;\n"
                 "UPDATE items SET qty = qty + 1 WHERE id = :id;\n"
                 "SELECT dx.publish('item', :id::text, 'QtyChanged', '{\"qty\": 1}');\n"
                 "COMMIT;\n")
OUTBOX_BULK = (f"\\set id random(1, {ROWS - 500})\nBEGIN;\n"
               "UPDATE items SET qty = qty + 1 WHERE id BETWEEN :id AND :id + 499;\n"
               "SELECT dx.publish('item', g::text, 'QtyChanged', '{\"qty\": 1}') "
               "FROM generate_series(:id, :id + 499) g;\nCOMMIT;\n")


def drain_outbox(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DELETE FROM dx.outbox")
        conn.execute("DELETE FROM dx.txn")
        conn.execute("DELETE FROM dx.txn_marker")
        conn.execute("VACUUM dx.outbox")


def bench_writes(env: dict[str, str], tmp: Path, seconds: int) -> dict[str, tuple[float, float]]:
    """tx/s (1-row, 500-row) per capture setup; prints the table."""
    db = fresh_db(env["DX_DATABASE_URL"])
    setup_table(db, ROWS)
    cfg_row = write_config(tmp, env, db, "bw_row", "at-least-once", "row")
    cfg_stmt = write_config(tmp, env, db, "bw_stmt", "at-least-once", "statement")
    cfg_logical = write_config(tmp, env, db, "bw_logical", "at-least-once", "logical")
    dx("init", "-c", str(cfg_row))
    results: dict[str, tuple[float, float]] = {}
    # logical: the slot exists and no relay decodes meanwhile (the write path's own cost:
    # REPLICA IDENTITY FULL's old rows in the WAL); decoding runs in the walsender
    for name, setup in [("no capture (baseline)", None), ("row trigger", cfg_row),
                        ("statement trigger", cfg_stmt), ("logical (slot, REPLICA IDENTITY "
                                                          "FULL)", cfg_logical),
                        ("application outbox", "outbox")]:
        if setup in (cfg_row, cfg_stmt, cfg_logical):
            dx("capture", "install", "-c", str(setup))
        else:
            dx("capture", "uninstall", "-c", str(cfg_row))
        single_script, bulk_script = (OUTBOX_SINGLE, OUTBOX_BULK) if setup == "outbox" \
            else (SINGLE, BULK)
        single = pgbench(db, single_script, seconds)
        drain_outbox(db)
        bulk = pgbench(db, bulk_script, seconds)
        drain_outbox(db)
        results[name] = (single, bulk)
    base_single, base_bulk = results["no capture (baseline)"]
    print("\n## Write throughput (pgbench, 2 clients, UPDATE transactions)")
    print("| capture | 1-row tx/s | overhead | 500-row tx/s | cost factor |")
    print("|---|---:|---:|---:|---:|")
    for name, (single, bulk) in results.items():
        print(f"| {name} | {single:,.0f} | {100 * (base_single / single - 1):+.1f}% | "
              f"{bulk:,.1f} | {base_bulk / bulk:.2f}x |")
    return results


def fill_backlog(db: str, n: int) -> None:
    with psycopg.connect(db) as conn:
        step = 5000
        for start in range(1, n + 1, step):
            conn.execute("UPDATE items SET qty = qty + 1 WHERE id BETWEEN %s AND %s",
                         (start, min(n, start + step - 1)))
            conn.commit()


@dataclass
class Drain:
    """One backlog drain: events/s from the first read to the last commit, the start-up
    before it (lease, producer and transactions init, state topic read, slot start), and the
    process's CPU time per event over the drain (user + sys of every thread: the relay's and
    librdkafka's; the benchmark's own thread only sleeps meanwhile)."""

    eps: float
    startup_s: float
    cpu_us: float


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_relay_until_empty(cfg: Path, expected: int) -> Drain:
    relay = Relay(load_config(cfg))
    t = threading.Thread(target=relay.run, daemon=True)
    cpu0: float | None = None
    start = time.monotonic()
    t.start()
    while relay.stats.events < expected:
        time.sleep(0.002)
        if cpu0 is None and relay.stats.first_read_at:
            cpu0 = cpu_s()  # the drain's CPU, start-up excluded (as its time is)
        if not t.is_alive():
            raise RuntimeError("relay stopped")
    cpu = cpu_s() - (cpu0 or 0.0)
    stats = relay.stats
    relay.stop.set()
    t.join(30)
    return Drain(expected / (stats.last_commit_at - stats.first_read_at),
                 stats.first_read_at - start, 1e6 * cpu / expected)


def bare_producer_rate(env: dict[str, str], n: int) -> float:
    topic = f"bench-bare-{uuid.uuid4().hex[:6]}"
    ensure_topics(AdminClient({"bootstrap.servers": env["DX_KAFKA_BOOTSTRAP"]}),
                  [TopicSpec(topic, "bench topic", 1, 1)])  # the stack never auto-creates
    p = Producer({"bootstrap.servers": env["DX_KAFKA_BOOTSTRAP"], "enable.idempotence": True,
                  "linger.ms": 5, "compression.type": "lz4"})
    payload = os.urandom(120)
    p.produce(topic, b"warm")
    p.flush(30)
    start = time.perf_counter()
    for i in range(n):
        while True:
            try:
                p.produce(topic, payload, key=str(i).encode())
                break
            except BufferError:
                p.poll(0.01)
        p.poll(0)
    p.flush(60)
    return n / (time.perf_counter() - start)


Figures = dict[str, float]


def bench_relay(env: dict[str, str], tmp: Path, backlog: int,
                seconds: int) -> dict[str, Figures]:
    """Per capture (logical, statement): drain and under-writes events/s per delivery mode."""
    print("\n## Relay throughput (events/s committed to Kafka; relay CPU µs per event)")
    print("| capture | scenario | exactly-once | at-least-once |")
    print("|---|---|---:|---:|")
    out = {capture: _bench_relay(env, tmp, backlog, seconds, capture)
           for capture in ("logical", "statement")}
    bare = bare_producer_rate(env, backlog)
    print(f"| - | baseline: bare idempotent producer, pre-encoded 120-byte records, no "
          f"database | {bare:,.0f} | |")
    return out


def _bench_relay(env: dict[str, str], tmp: Path, backlog: int, seconds: int,
                 capture: str) -> Figures:
    drain: dict[str, Drain] = {}
    under: dict[str, float] = {}
    for mode in ("exactly-once", "at-least-once"):
        db = fresh_db(env["DX_DATABASE_URL"])
        setup_table(db, backlog)
        prefix = f"br{uuid.uuid4().hex[:6]}"
        cfg = write_config(tmp, env, db, prefix, mode, capture)
        dx("capture", "install", "-c", str(cfg))
        fill_backlog(db, backlog)
        drain[mode] = run_relay_until_empty(cfg, backlog)
        # under concurrent writes: pgbench writers and the relay at the same time
        relay = Relay(load_config(cfg))
        t = threading.Thread(target=relay.run, daemon=True)
        t.start()
        time.sleep(1)
        before = relay.stats.events
        cpu0 = cpu_s()
        start = time.perf_counter()
        tps = pgbench(db, BULK.replace("500", "50").replace("499", "49"), seconds)
        relayed = relay.stats.events - before
        elapsed = time.perf_counter() - start
        cpu = cpu_s() - cpu0
        relay.stop.set()
        t.join(30)
        under[mode] = relayed / elapsed
        under[mode + " writes"] = tps * 50
        under[mode + " cpu"] = 1e6 * cpu / max(1, relayed)
    name = "dx logical" if capture == "logical" else f"dx trigger ({capture})"

    def d(m: str) -> str:
        x = drain[m]
        return f"{x.eps:,.0f} (start-up {x.startup_s:.1f} s, {x.cpu_us:.0f} µs)"

    def u(m: str) -> str:
        return (f"{under[m]:,.0f} (written {under[m + ' writes']:,.0f}/s, "
                f"{under[m + ' cpu']:.0f} µs)")

    print(f"| {name} | draining a backlog of {backlog:,} | {d('exactly-once')} | "
          f"{d('at-least-once')} |")
    print(f"| {name} | under concurrent writes (50-row tx, 2 writers) | {u('exactly-once')} | "
          f"{u('at-least-once')} |")
    return {**{f"drain {m}": v.eps for m, v in drain.items()},
            **{f"under {m}": under[m] for m in drain}}


def start_relay(cfg: Path) -> subprocess.Popen[str]:
    """``dx relay`` as its own process (as in production: no GIL shared with the benchmark's
    writer and consumer); returns once it reports itself active."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "relay", "-c", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if ": active" in line:
            return proc
    raise RuntimeError(f"relay did not start (exit {proc.wait()})")


def bench_latency(env: dict[str, str], tmp: Path, rate: int,
                  seconds: int) -> dict[tuple[str, str], tuple[float, float]]:
    """(p50, p99) ms per (capture, relay mode)."""
    out: dict[tuple[str, str], tuple[float, float]] = {}
    print(f"\n## Commit-to-Kafka latency at {rate:,} rows/s (ms)")
    print("| capture | relay mode | p50 | p99 | max | events |")
    print("|---|---|---:|---:|---:|---:|")
    for capture, mode in [(c, m) for c in ("logical", "row")
                          for m in ("at-least-once", "exactly-once")]:
        db = fresh_db(env["DX_DATABASE_URL"])
        setup_table(db, ROWS)
        prefix = f"bl{uuid.uuid4().hex[:6]}"
        cfg = write_config(tmp, env, db, prefix, mode, capture)
        dx("capture", "install", "-c", str(cfg))
        relay = start_relay(cfg)
        try:
            lat = consume_latencies(env, f"{prefix}.public.items", db, rate, seconds)
        finally:
            relay.terminate()
            relay.wait(30)
        lat.sort()

        def p(q: float, lat: list[float] = lat) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))]

        print(f"| {capture} | {mode} | {p(0.5):.1f} | {p(0.99):.1f} | {lat[-1]:.1f} | "
              f"{len(lat):,} |")
        out[(capture, mode)] = (p(0.5), p(0.99))
    return out


def consume_latencies(env: dict[str, str], topic: str, db: str, rate: int,
                      seconds: int) -> list[float]:
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    de = AvroDeserializer(SchemaRegistryClient({"url": env["DX_SCHEMA_REGISTRY_URL"]}))
    c = Consumer({"bootstrap.servers": env["DX_KAFKA_BOOTSTRAP"], "group.id": topic,
                  "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                  "fetch.wait.max.ms": 5})
    c.subscribe([topic])
    stop = threading.Event()

    def write() -> None:
        # 10 transactions of 10 rows each per tick of 50 ms = rate rows/s at rate=2000
        per_tick = max(1, rate // 20)
        with psycopg.connect(db, autocommit=True) as conn:
            next_t = time.perf_counter()
            i = 0
            while not stop.is_set():
                for _ in range(per_tick // 10):
                    conn.execute("UPDATE items SET qty = qty + 1 WHERE id BETWEEN %s AND %s",
                                 (i % (ROWS - 10) + 1, i % (ROWS - 10) + 10))
                    i += 10
                next_t += 0.05
                time.sleep(max(0.0, next_t - time.perf_counter()))

    w = threading.Thread(target=write, daemon=True)
    lat: list[float] = []
    # steady state only: schema registration, topic creation and the consumer group's join
    # (the broker delays the first rebalance by up to 3 s) happen before the first message;
    # changes committed in the second after it arrived are the first ones measured
    warm_until_ms: float | None = None
    w.start()
    end = time.time() + seconds + 2
    while time.time() < end:
        msg = c.poll(0.1)
        if msg is None or msg.error() or msg.value() is None:
            continue
        now_ms = time.time() * 1000
        v = de(msg.value(), SerializationContext(topic, MessageField.VALUE))
        if warm_until_ms is None:
            warm_until_ms = now_ms + 1000
            end = time.time() + seconds + 1
        if v["source"]["ts_ms"] >= warm_until_ms:
            lat.append(now_ms - v["source"]["ts_ms"])
    stop.set()
    w.join()
    c.close()
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--only", choices=["writes", "relay", "latency", "debezium"],
                    action="append", help="run only these parts (repeatable)")
    ap.add_argument("--no-debezium", action="store_true",
                    help="skip Debezium on Kafka Connect (bench/debezium_peer.py)")
    args = ap.parse_args()
    parts = set(args.only or ["writes", "relay", "latency", "debezium"])
    if args.no_debezium:
        parts.discard("debezium")
    env = services()
    os.environ.update(env)
    seconds = 5 if args.quick else 15
    with tempfile.TemporaryDirectory() as d:
        try:
            run(args, parts, env, seconds, Path(d))
        finally:
            drop_created(env["DX_DATABASE_URL"])


def run(args: argparse.Namespace, parts: set[str], env: dict[str, str], seconds: int,
        tmp: Path) -> None:
    print(f"# dx capture/relay benchmark ({os.cpu_count()} cores)")
    backlog = 20_000 if args.quick else 100_000
    writes = bench_writes(env, tmp, seconds) if "writes" in parts else {}
    relay = bench_relay(env, tmp, backlog, seconds) if "relay" in parts else {}
    lat = bench_latency(env, tmp, 2000, seconds) if "latency" in parts else {}
    if "debezium" in parts:
        import debezium_peer

        peer = debezium_peer.measure(env, backlog=backlog, seconds=seconds)
        debezium_peer.print_figures(peer)
        side_by_side(writes, relay, lat, peer)


def side_by_side(writes: dict[str, tuple[float, float]], relay: dict[str, Figures],
                 lat: dict[tuple[str, str], tuple[float, float]], peer: Any) -> None:
    """dx logical, dx trigger and Debezium in one table, with the ratios dx/Debezium (for
    costs and latencies, lower is better; for events/s, higher)."""
    print("\n## Side by side (same run, same stack, same table)")
    print("| figure | dx logical | dx trigger | Debezium | logical/Debezium | "
          "trigger/Debezium |")
    print("|---|---:|---:|---:|---:|---:|")

    def row(name: str, logical: float | None, trigger: float | None, dbz: float,
            fmt: str = ",.0f") -> None:
        cells = [format(v, fmt) if v is not None else "-" for v in (logical, trigger, dbz)]
        ratios = [f"{v / dbz:.2f}" if v is not None and dbz else "-"
                  for v in (logical, trigger)]
        print(f"| {name} | {' | '.join(cells)} | {' | '.join(ratios)} |")

    if writes:
        base = writes["no capture (baseline)"][0]
        cost = {k: 100 * (base / v[0] - 1) for k, v in writes.items()}
        row("write cost, 1-row tx (%)",
            cost.get("logical (slot, REPLICA IDENTITY FULL)"), cost.get("row trigger"),
            100 * (peer.writes_off_tps / peer.writes_on_tps - 1), "+.1f")
    for mode in ("exactly-once", "at-least-once"):
        if relay:
            row(f"drain events/s (dx {mode})", relay["logical"][f"drain {mode}"],
                relay["statement"][f"drain {mode}"], peer.drain_eps)
            row(f"events/s under writes (dx {mode})", relay["logical"][f"under {mode}"],
                relay["statement"][f"under {mode}"], peer.concurrent_eps)
        if lat:
            for i, q in ((0, "p50"), (1, "p99")):
                row(f"latency {q} ms at 2,000 rows/s (dx {mode})",
                    lat[("logical", mode)][i], lat[("row", mode)][i],
                    (peer.latency_p50_ms, peer.latency_p99_ms)[i], ".1f")


if __name__ == "__main__":
    main()
