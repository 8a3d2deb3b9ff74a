"""Debezium peer benchmark: the same figures bench/capture_relay.py prints for dx's relay, measured
for Debezium's PostgreSQL connector (3.6.0.Final, pgoutput, Avro through Apicurio's converter in
Confluent wire format) on a Kafka Connect worker from deploy/local/connect_worker.py.

    python bench/debezium_peer.py            # services from DX_* env vars or deploy/local/stack
    python bench/debezium_peer.py --quick    # smaller run

Same table as bench/capture_relay.py (``items``), same writes. Debezium gets its own publication
and slot, ``snapshot.mode=no_data`` (stream only) and ``poll.interval.ms=10`` (the default 500 ms
puts p50 latency near half a second). The worker's JVM is warmed with a throw-away drain before
anything is measured. Importable: :func:`measure` returns :class:`PeerFigures` for a side-by-side
table (bench/capture_relay.py prints one).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from confluent_kafka import Consumer, TopicPartition

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "deploy" / "local"))

import connect_worker  # noqa: E402
from bench_stack import fresh_db, services  # noqa: E402

POLL_INTERVAL_MS = 10


@dataclass(frozen=True)
class PeerFigures:
    backlog: int
    drain_eps: float  # events/s draining a backlog written before the connector started
    concurrent_eps: float  # events/s delivered while pgbench writes
    concurrent_written: float  # rows/s pgbench wrote meanwhile
    latency_p50_ms: float  # commit (source.ts_ms) to consumer, at `rate` rows/s
    latency_p99_ms: float
    rate: int
    writes_off_tps: float  # pgbench 1-row UPDATE tx/s, no capture
    writes_on_tps: float  # the same with Debezium streaming the table


@dataclass(frozen=True)
class Peer:
    """A running worker and the services it reads and writes."""

    env: dict[str, str]
    connect: connect_worker.Connect


@contextmanager
def worker(env: dict[str, str], exactly_once: bool = False) -> Iterator[Peer]:
    name = f"bench-{os.getpid()}"
    started = connect_worker.start(name, env["DX_KAFKA_BOOTSTRAP"], env["DX_SCHEMA_REGISTRY_URL"],
                                   exactly_once=exactly_once)
    try:
        yield Peer(env, connect_worker.Connect(started.url))
    finally:
        connect_worker.stop(name)


def source_config(db_url: str, registry_url: str, topic_prefix: str, slot: str,
                  table: str = "public.items") -> dict[str, str]:
    """Debezium's PostgreSQL source for one table, streaming only, Avro in Confluent format."""
    url = urlsplit(db_url)
    return {
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "tasks.max": "1",
        "plugin.name": "pgoutput",
        "database.hostname": url.hostname or "127.0.0.1",
        "database.port": str(url.port or 5432),
        "database.user": url.username or "",
        "database.password": url.password or "",
        "database.dbname": url.path.lstrip("/"),
        "topic.prefix": topic_prefix,
        "table.include.list": table,
        "slot.name": slot,
        "publication.name": slot,
        "publication.autocreate.mode": "disabled",
        "snapshot.mode": "no_data",
        "poll.interval.ms": str(POLL_INTERVAL_MS),
        # Connect creates the change topic itself (KIP-158): brokers here never auto-create
        "topic.creation.default.replication.factor": "-1",
        "topic.creation.default.partitions": "1",
        **connect_worker.avro_converter(registry_url, "key.converter"),
        **connect_worker.avro_converter(registry_url, "value.converter"),
    }


@dataclass
class Capture:
    """Debezium capturing ``items`` in a fresh database: publication and slot exist from
    :func:`capture` on, so writes made before :meth:`start` are the backlog it drains."""

    peer: Peer
    db: str
    prefix: str

    @property
    def slot(self) -> str:
        return self.prefix

    @property
    def topic(self) -> str:
        return f"{self.prefix}.public.items"

    def start(self) -> None:
        self.peer.connect.create(self.prefix, source_config(
            self.db, self.peer.env["DX_SCHEMA_REGISTRY_URL"], self.prefix, self.slot))
        self.peer.connect.wait_running(self.prefix)

    def stop(self) -> None:
        self.peer.connect.delete(self.prefix)


@contextmanager
def capture(peer: Peer, rows: int) -> Iterator[Capture]:
    from capture_relay import setup_table

    db = fresh_db(peer.env["DX_DATABASE_URL"], "dbz")
    setup_table(db, rows)
    cap = Capture(peer, db, f"dbz{uuid.uuid4().hex[:8]}")
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f"CREATE PUBLICATION {cap.slot} FOR TABLE items")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (cap.slot,))
    try:
        yield cap
    finally:
        cap.stop()
        _drop(peer.env["DX_DATABASE_URL"], db, cap.slot)


def _drop(admin_url: str, db: str, slot: str | None) -> None:
    """Drop the slot (once the connector let go of it) and the database."""
    deadline = time.monotonic() + 60
    with psycopg.connect(admin_url, autocommit=True) as conn:
        while slot is not None and time.monotonic() < deadline:
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                               (slot,)).fetchone()
            if row is None:
                break
            if not row[0]:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                break
            time.sleep(0.2)
        name = db.rsplit("/", 1)[1]
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _consumer(env: dict[str, str], topic: str) -> Consumer:
    c = Consumer({"bootstrap.servers": env["DX_KAFKA_BOOTSTRAP"], "group.id": topic,
                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                  "isolation.level": "read_committed", "fetch.wait.max.ms": 5})
    c.assign([TopicPartition(topic, 0, 0)])
    return c


class Receiver:
    """Counts a topic's records as a consumer receives them, in a thread, with the receive time
    of each (Kafka's record timestamps will not do: Debezium stamps records with the commit
    time, so they measure the writer, not the connector)."""

    def __init__(self, env: dict[str, str], topic: str) -> None:
        self.consumer = _consumer(env, topic)
        self.times: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                for msg in self.consumer.consume(10_000, 0.1):
                    if msg.error() is None:
                        self.times.append(time.time())
        finally:
            self.consumer.close()

    def wait_quiet(self, quiet: float = 3, timeout: float = 300) -> list[float]:
        """Every record, once none arrived for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (not self.times
                                               or time.time() - self.times[-1] < quiet):
            time.sleep(0.1)
        self.stop.set()
        self.thread.join(30)
        return self.times

    def wait_for(self, count: int, timeout: float) -> list[float]:
        deadline = time.monotonic() + timeout
        while len(self.times) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stop.set()
        self.thread.join(30)
        if len(self.times) < count:
            raise RuntimeError(f"{len(self.times)} of {count} events after {timeout:.0f}s")
        return self.times


def drain_rate(peer: Peer, backlog: int) -> float:
    """Events/s over a backlog of `backlog` single-row changes written before the connector
    starts: first to last record received (start-up time excluded)."""
    from capture_relay import fill_backlog

    with capture(peer, backlog) as cap:
        fill_backlog(cap.db, backlog)
        receiver = Receiver(peer.env, cap.topic)
        cap.start()
        times = receiver.wait_for(backlog, 300)
    return (backlog - 1) / max(1e-3, times[backlog - 1] - times[0])


def concurrent_rate(peer: Peer, seconds: int) -> tuple[float, float]:
    """(events/s received while pgbench runs 50-row UPDATEs with 2 clients, rows/s it wrote)."""
    from capture_relay import BULK, ROWS, pgbench

    with capture(peer, ROWS) as cap:
        cap.start()
        receiver = Receiver(peer.env, cap.topic)
        t0 = time.time()
        tps = pgbench(cap.db, BULK.replace("500", "50").replace("499", "49"), seconds)
        t1 = time.time()
        times = receiver.wait_quiet()
    inside = sum(1 for t in times if t0 <= t <= t1)
    return inside / (t1 - t0), tps * 50


def latency(peer: Peer, rate: int, seconds: int) -> tuple[float, float, int]:
    """(p50, p99 ms, events) from commit (``source.ts_ms``) to a read_committed consumer."""
    from capture_relay import ROWS, consume_latencies

    with capture(peer, ROWS) as cap:
        cap.start()
        lat = sorted(consume_latencies(peer.env, cap.topic, cap.db, rate, seconds))
    if not lat:
        raise RuntimeError("no latency samples")

    def p(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))]

    return p(0.5), p(0.99), len(lat)


def write_throughput(peer: Peer, seconds: int) -> tuple[float, float]:
    """pgbench 1-row UPDATE tx/s without capture, then with Debezium streaming the table."""
    from capture_relay import ROWS, SINGLE, pgbench, setup_table

    db = fresh_db(peer.env["DX_DATABASE_URL"], "dbz")
    try:
        setup_table(db, ROWS)
        off = pgbench(db, SINGLE, seconds)
    finally:
        _drop(peer.env["DX_DATABASE_URL"], db, None)
    with capture(peer, ROWS) as cap:
        cap.start()
        on = pgbench(cap.db, SINGLE, seconds)
    return off, on


def warm_up(peer: Peer) -> None:
    """A throw-away drain: the first run on a fresh worker JVM is ~35% slower."""
    drain_rate(peer, 5_000)


def measure(env: dict[str, str], *, backlog: int = 100_000, seconds: int = 15,
            rate: int = 2000, exactly_once: bool = False) -> PeerFigures:
    """Every figure, on a worker started (and stopped) for the purpose."""
    with worker(env, exactly_once) as peer:
        warm_up(peer)
        drain = drain_rate(peer, backlog)
        concurrent, written = concurrent_rate(peer, seconds)
        p50, p99, _ = latency(peer, rate, seconds)
        off, on = write_throughput(peer, seconds)
    return PeerFigures(backlog, drain, concurrent, written, p50, p99, rate, off, on)


def print_figures(f: PeerFigures, title: str = "Debezium 3.6 (Kafka Connect, Avro)") -> None:
    print(f"\n## {title}")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| draining a backlog of {f.backlog:,} (events/s) | {f.drain_eps:,.0f} |")
    print(f"| under concurrent writes, 50-row tx, 2 writers (events/s) | {f.concurrent_eps:,.0f} "
          f"(written {f.concurrent_written:,.0f}/s) |")
    print(f"| commit-to-Kafka latency at {f.rate:,} rows/s, p50 / p99 (ms) | "
          f"{f.latency_p50_ms:.1f} / {f.latency_p99_ms:.1f} |")
    print(f"| pgbench 1-row UPDATE tx/s, capture off / on | {f.writes_off_tps:,.0f} / "
          f"{f.writes_on_tps:,.0f} ({100 * (f.writes_off_tps / f.writes_on_tps - 1):+.1f}% "
          "cost) |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--exactly-once", action="store_true",
                    help="worker with exactly.once.source.support=enabled")
    args = ap.parse_args(argv)
    env = services()
    os.environ.update(env)
    print(f"# Debezium peer benchmark ({os.cpu_count()} cores)")
    figures = measure(env, backlog=20_000 if args.quick else 100_000,
                      seconds=5 if args.quick else 15, exactly_once=args.exactly_once)
    print_figures(figures, "Debezium 3.6 (Kafka Connect, Avro"
                  + (", exactly-once)" if args.exactly_once else ")"))


if __name__ == "__main__":
    main()
