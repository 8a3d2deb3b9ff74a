"""Inbound apply benchmark: the source worker's rate (rows/s) beside naive row-by-row applies of
the same events, measured in one run on the same machine.

    python bench/apply.py             # services from DX_* env vars or deploy/local/stack
    python bench/apply.py --events 50000

The events are Avro (Confluent wire format, registered schema), a third of them updates of
earlier keys, with a version column under a last-writer-wins policy: the realistic inbound path.
Every contender consumes the same topic from Kafka, decodes the same bytes and stores its
offsets exactly-once in PostgreSQL:

* ``source worker``: ``dx source run`` (COPY-staged batches, one upsert per batch, offsets in
  the same transaction). Timed from the end of its first batch to the end of its last, so the
  consumer-group join is not counted.
* ``row-by-row, commit per event``: one upsert and one offset update per transaction, the way a
  hand-written consumer usually does it.
* ``row-by-row, commit per batch``: the same statements, one transaction per 1000 events.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

import fastavro
import psycopg
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_stack import fresh_db, services  # noqa: E402

from pipeline.config.loader import load_config  # noqa: E402
from pipeline.source.decode import AvroDecoder  # noqa: E402
from pipeline.source.worker import SourceWorker  # noqa: E402

TABLE = """
CREATE TABLE items (
    id bigint PRIMARY KEY, sku text NOT NULL, name varchar(80) NOT NULL, price numeric(10,2),
    qty int, version bigint NOT NULL, updated_at timestamptz
)"""

SCHEMA = {
    "type": "record", "name": "Item", "namespace": "bench.erp",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "sku", "type": "string"},
        {"name": "name", "type": "string"},
        {"name": "price", "type": ["null", {"type": "bytes", "logicalType": "decimal",
                                             "precision": 10, "scale": 2}]},
        {"name": "qty", "type": ["null", "int"]},
        {"name": "version", "type": "long"},
        {"name": "updated_at", "type": ["null", {"type": "long",
                                                  "logicalType": "timestamp-micros"}]},
    ],
}

UPSERT = """
INSERT INTO {t} AS t (id, sku, name, price, qty, version, updated_at)
VALUES (%(id)s, %(sku)s, %(name)s, %(price)s, %(qty)s, %(version)s, %(updated_at)s)
ON CONFLICT (id) DO UPDATE SET sku = excluded.sku, name = excluded.name, price = excluded.price,
    qty = excluded.qty, version = excluded.version, updated_at = excluded.updated_at
WHERE t.version < excluded.version
"""


def produce_events(env: dict[str, str], topic: str, n: int) -> None:
    admin = AdminClient({"bootstrap.servers": env["DX_KAFKA_BOOTSTRAP"]})
    for fut in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        fut.result(30)
    registry = SchemaRegistryClient({"url": env["DX_SCHEMA_REGISTRY_URL"]})
    schema_id = registry.register_schema(f"{topic}-value", Schema(json.dumps(SCHEMA), "AVRO"))
    parsed = fastavro.parse_schema(SCHEMA)
    header = b"\x00" + int(schema_id).to_bytes(4, "big")
    p = Producer({"bootstrap.servers": env["DX_KAFKA_BOOTSTRAP"], "linger.ms": 50,
                  "compression.type": "lz4", "enable.idempotence": True})
    base = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    keys = max(1, n * 2 // 3)
    for i in range(n):
        k = i % keys
        buf = io.BytesIO()
        buf.write(header)
        fastavro.schemaless_writer(buf, parsed, {
            "id": k, "sku": f"SKU-{k:08d}", "name": f"Product {k} rev {i}",
            "price": Decimal(f"{i % 9000}.{i % 100:02d}"), "qty": i % 50, "version": i,
            "updated_at": base + dt.timedelta(seconds=i)})
        while True:
            try:
                p.produce(topic, key=str(k).encode(), value=buf.getvalue())
                break
            except BufferError:
                p.poll(0.05)
    if p.flush(120):
        raise SystemExit("bench: could not produce the events")


def run_worker(env: dict[str, str], db: str, topic: str, tmp: Path, batch: int) -> float:
    cfg = tmp / "dx.yaml"
    cfg.write_text(f"""
database: {{url: "{db}"}}
kafka: {{bootstrap_servers: "{env['DX_KAFKA_BOOTSTRAP']}"}}
schema_registry: {{url: "{env['DX_SCHEMA_REGISTRY_URL']}"}}
sources:
  - name: bench
    topic: {topic}
    format: avro
    origin: erp
    table: items
    conflict: {{column: version}}
    batch_size: {batch}
    commit_to_kafka: false
""")
    marks: list[tuple[float, int]] = []
    worker = SourceWorker(load_config(cfg), "bench", stop_when_idle_s=1.5,
                          on_batch=lambda n, _f: marks.append((time.perf_counter(), n)))
    worker.run()
    if worker.stats.failed:
        raise SystemExit(f"bench: {worker.stats.failed} events failed")
    timed = sum(n for _, n in marks[1:])
    return timed / (marks[-1][0] - marks[0][0])


def naive(env: dict[str, str], db: str, topic: str, n: int, table: str,
          commit_every: int) -> float:
    """Consume, decode, upsert one row per statement; offsets stored in the same transaction."""
    with psycopg.connect(db) as conn:
        conn.execute(f"CREATE TABLE {table} (LIKE items INCLUDING ALL)")
        conn.execute("CREATE TABLE IF NOT EXISTS naive_offsets (name text PRIMARY KEY, "
                     "next_offset bigint)")
    registry = SchemaRegistryClient({"url": env["DX_SCHEMA_REGISTRY_URL"]})
    decode = AvroDecoder(registry, env["DX_SCHEMA_REGISTRY_URL"])
    c = Consumer({"bootstrap.servers": env["DX_KAFKA_BOOTSTRAP"],
                  "group.id": f"bench-{uuid.uuid4().hex[:6]}", "enable.auto.commit": False,
                  "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    upsert = UPSERT.format(t=table)
    done = 0
    start: float | None = None
    with psycopg.connect(db) as conn:
        while done < n:
            msg = c.poll(1.0)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise SystemExit(f"bench: {err}")
            if start is None:
                start = time.perf_counter()
            value, offset = msg.value(), msg.offset()
            assert value is not None and offset is not None  # a data message has both
            row = decode(value)
            conn.execute("SELECT set_config('dx.origin', 'erp', true)")
            conn.execute(upsert, row)
            conn.execute("INSERT INTO naive_offsets VALUES (%s, %s) ON CONFLICT (name) DO "
                         "UPDATE SET next_offset = excluded.next_offset",
                         (table, offset + 1))
            done += 1
            if done % commit_every == 0:
                conn.commit()
        conn.commit()
    c.close()
    assert start is not None
    return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--naive-events", type=int, default=5_000,
                    help="events for each naive baseline (they are slow)")
    ap.add_argument("--batch", type=int, default=5000)
    args = ap.parse_args()
    env = services()
    db = fresh_db(env["DX_DATABASE_URL"], "bench_apply")
    with psycopg.connect(db) as conn:
        conn.execute(TABLE)
    topic = f"bench.apply.{uuid.uuid4().hex[:8]}"
    print(f"producing {args.events} Avro events to {topic} ...", file=sys.stderr)
    produce_events(env, topic, args.events)
    with tempfile.TemporaryDirectory() as tmp:
        worker = run_worker(env, db, topic, Path(tmp), args.batch)
    per_event = naive(env, db, topic, args.naive_events, "naive_each", 1)
    per_batch = naive(env, db, topic, args.naive_events, "naive_batch", 1000)
    print(f"inbound apply, {args.events} Avro events (1/3 updates, version LWW), "
          f"{os.cpu_count()} CPUs")
    print(f"  source worker (batch {args.batch}, COPY + one upsert)  {worker:>9,.0f} rows/s")
    print(f"  row-by-row, commit per event (baseline)     {per_event:>9,.0f} rows/s"
          f"   x{worker / per_event:.1f}")
    print(f"  row-by-row, commit per 1000 events          {per_batch:>9,.0f} rows/s"
          f"   x{worker / per_batch:.1f}")


if __name__ == "__main__":
    main()
