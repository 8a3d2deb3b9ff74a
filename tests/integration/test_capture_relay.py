"""Capture and relay against the real stack: every committed change reaches Kafka once, in
order per key; rolled-back changes never do; long transactions are reported, never skipped."""

from __future__ import annotations

import json
import random
import struct
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from tests.integration.relay_support import (
    TopicReader,
    dx,
    execute,
    raw_first_message,
    relay_thread,
    write_config,
)

PRODUCTS = """
CREATE TABLE products (
    id int PRIMARY KEY, sku text NOT NULL, price numeric(10,2), v int NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(), secret text
);
"""
TABLES = """
  - name: products
    columns: [id, sku, price, v, updated_at]
"""


@pytest.fixture
def shop(stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path,
         capture_mode: str) -> dict[str, Any]:
    execute(pg_db, PRODUCTS)
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, TABLES,
                       capture_mode=capture_mode)
    res = dx("capture", "install", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert f"capture mode: {capture_mode}" in res.stdout
    return {"config": cfg, "db": pg_db, "topic": f"{topic_prefix}.public.products",
            "prefix": topic_prefix, "mode": capture_mode}


def test_row_changes_arrive_in_order_with_debezium_envelope(stack: Any,
                                                             shop: dict[str, Any]) -> None:
    execute(shop["db"], "INSERT INTO products (id, sku, price, secret) VALUES "
                        "(1, 'a', 1.50, 'hidden'), (2, 'b', 2.00, 'hidden')")
    execute(shop["db"], "UPDATE products SET price = 3.25, v = v + 1 WHERE id = 1")
    execute(shop["db"], "UPDATE products SET secret = 'only a hidden column changed'")
    execute(shop["db"], "DELETE FROM products WHERE id = 2")
    execute(shop["db"], "BEGIN", "INSERT INTO products (id, sku) VALUES (3, 'x')", "ROLLBACK")
    execute(shop["db"], "UPDATE products SET v = v + 1 WHERE id = 1", origin="erp")
    reader = TopicReader(stack, shop["topic"])
    with relay_thread(shop["config"]):
        events = reader.read(until=6, settle_s=1.0)
    reader.close()
    ops = [(e.key["id"] if e.key else None, e.value["op"] if e.value else "tombstone")
           for e in events]
    assert ops == [(1, "c"), (2, "c"), (1, "u"), (2, "d"), (2, "tombstone"), (1, "u")]
    first = events[0].value
    assert first is not None
    assert set(first["after"]) == {"id", "sku", "price", "v", "updated_at"}  # allow-list
    assert str(first["after"]["price"]) == "1.50"
    assert first["source"]["table"] == "products" and first["source"]["connector"] == "dx"
    assert events[2].value["before"]["price"] == first["after"]["price"]  # type: ignore[index]
    assert events[-1].value["origin"] == "erp"  # type: ignore[index]
    assert events[-1].headers["dx.origin"] == b"erp"
    ids = [e.value["event_id"] for e in events if e.value]
    assert len(set(ids)) == len(ids)
    # Confluent wire format: magic byte 0 and the id the registry has for the subject.
    raw = raw_first_message(stack, shop["topic"])
    registry = SchemaRegistryClient({"url": stack.schema_registry_url})
    latest = registry.get_latest_version(f"{shop['topic']}-value")
    assert raw[0] == 0 and struct.unpack(">I", raw[1:5])[0] == latest.schema_id


def test_per_key_order_survives_xid_inversion(stack: Any, shop: dict[str, Any]) -> None:
    """T1 takes an older xid, T2 a younger one; T2 updates the row and commits first, then T1
    overwrites it. Ordering by xid would deliver T1 before T2 and leave consumers with the
    wrong final state; dx orders by commit."""
    execute(shop["db"], "INSERT INTO products (id, sku) VALUES (1, 'k'), (2, 'other')")
    t1 = psycopg.connect(shop["db"])
    t1.execute("UPDATE products SET sku = 'x1' WHERE id = 2")  # T1 gets its xid now
    execute(shop["db"], "UPDATE products SET v = 1 WHERE id = 1")  # T2: younger xid, commits
    t1.execute("UPDATE products SET v = 2 WHERE id = 1")
    t1.commit()
    t1.close()
    reader = TopicReader(stack, shop["topic"])
    with relay_thread(shop["config"]):
        events = reader.read(until=5, settle_s=0.5)
    reader.close()
    versions = [e.value["after"]["v"] for e in events
                if e.value and e.key == {"id": 1} and e.value["op"] == "u"]
    assert versions == [1, 2]


def test_concurrent_writers_every_commit_once_in_key_order(stack: Any,
                                                           shop: dict[str, Any]) -> None:
    keys = 20
    execute(shop["db"], f"INSERT INTO products (id, sku) SELECT g, 's' || g "
                        f"FROM generate_series(1, {keys}) g")
    committed = {"n": keys}
    lock = threading.Lock()
    stop = threading.Event()

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        with psycopg.connect(shop["db"]) as conn:
            while not stop.is_set():
                ks = rnd.sample(range(1, keys + 1), 2)
                try:
                    conn.execute("UPDATE products SET v = v + 1 WHERE id = %s", (ks[0],))
                    time.sleep(rnd.random() * 0.005)  # commit later than younger xids
                    conn.execute("UPDATE products SET v = v + 1 WHERE id = %s", (ks[1],))
                    if rnd.random() < 0.2:
                        conn.rollback()
                        continue
                    conn.commit()
                    with lock:
                        committed["n"] += 2
                except psycopg.errors.DeadlockDetected:
                    conn.rollback()

    reader = TopicReader(stack, shop["topic"])
    with relay_thread(shop["config"]):
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(4)
        stop.set()
        for t in threads:
            t.join()
        events = reader.read(until=committed["n"], timeout_s=90, settle_s=2.0)
    reader.close()
    assert len(events) == committed["n"]
    ids = [e.value["event_id"] for e in events if e.value]
    assert len(set(ids)) == len(ids)
    last: dict[int, int] = {}
    for e in events:
        assert e.key is not None and e.value is not None
        v = e.value["after"]["v"]
        assert v == last.get(e.key["id"], -1) + 1, "per-key order broken"
        last[e.key["id"]] = v
    with psycopg.connect(shop["db"]) as conn:
        final = dict(conn.execute("SELECT id, v FROM products").fetchall())
    assert last == final


def test_long_open_transaction_is_reported_and_not_skipped(stack: Any, shop: dict[str, Any],
                                                           tmp_path: Path) -> None:
    long_txn = psycopg.connect(shop["db"], application_name="long-writer")
    long_txn.execute("INSERT INTO products (id, sku) VALUES (100, 'slow')")
    execute(shop["db"], "INSERT INTO products (id, sku) VALUES (1, 'fast')")
    reader = TopicReader(stack, shop["topic"])
    with relay_thread(shop["config"]):
        first = reader.read(until=1, settle_s=1.0)
        assert [e.key for e in first] == [{"id": 1}]
        if shop["mode"] == "logical":  # nobody waits for it: later commits flow past it
            execute(shop["db"], "INSERT INTO products (id, sku) VALUES (2, 'fast')")
            assert [e.key for e in reader.read(until=2, settle_s=0.5)] == [{"id": 1}, {"id": 2}]
        else:  # it holds later commits back: reported by dx status, never skipped
            time.sleep(1.2)
            res = dx("status", "-c", str(shop["config"]), "--json", "--long-txn-s", "1")
            assert res.returncode == 1
            report = json.loads(res.stdout)
            pids = [t["pid"] for t in report["relay"]["open_transactions"]
                    if t["holds_captured_changes"]]
            assert pids == [long_txn.info.backend_pid]
        long_txn.commit()
        events = reader.read(until=len(reader.events) + 1, settle_s=0.5)
    long_txn.close()
    reader.close()
    assert [e.key for e in events][-1] == {"id": 100}
    assert len(events) == (3 if shop["mode"] == "logical" else 2)


def test_statement_capture_and_application_outbox(stack: Any, pg_db: str, topic_prefix: str,
                                                  tmp_path: Path, capture_mode: str) -> None:
    """Trigger mode with statement triggers; logical mode (where ``capture: statement`` has
    no triggers to choose) with the outbox as transactional logical messages."""
    execute(pg_db, PRODUCTS)
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       TABLES + "    capture: statement\n", capture_mode=capture_mode)
    assert dx("capture", "install", "-c", str(cfg)).returncode == 0
    from pipeline.capture.outbox import publish

    with psycopg.connect(pg_db) as conn:
        conn.execute("INSERT INTO products (id, sku) SELECT g, 's' FROM generate_series(1, 500) g")
        publish(conn, "order", 42, "OrderPlaced", {"total": "9.99"})
    with psycopg.connect(pg_db) as conn:
        publish(conn, "order", 43, "OrderPlaced", {"total": "1"})
        conn.rollback()
    execute(pg_db, "UPDATE products SET price = 1 WHERE id <= 250")
    topic = f"{topic_prefix}.public.products"
    products = TopicReader(stack, topic)
    orders = TopicReader(stack, f"{topic_prefix}.outbox.order")
    with relay_thread(cfg):
        got = products.read(until=750, settle_s=0.5)
        order_events = orders.read(until=1, settle_s=1.0)
    products.close()
    orders.close()
    assert [e.value["op"] for e in got].count("c") == 500  # type: ignore[index]
    assert [e.value["op"] for e in got].count("u") == 250  # type: ignore[index]
    assert len(order_events) == 1
    ev = order_events[0].value
    assert ev is not None and ev["aggregateid"] == "42" and ev["type"] == "OrderPlaced"
    assert json.loads(ev["payload"]) == {"total": "9.99"}
    with psycopg.connect(pg_db) as conn:  # logical mode leaves nothing behind to purge
        left = conn.execute("SELECT count(*) FROM dx.outbox").fetchone()
    assert left == (0,)


def test_snapshot_then_stream_keeps_latest_state(stack: Any, shop: dict[str, Any]) -> None:
    execute(shop["db"], "ALTER TABLE products DISABLE TRIGGER USER",
            "INSERT INTO products (id, sku) SELECT g, 'pre' FROM generate_series(1, 3000) g",
            "ALTER TABLE products ENABLE TRIGGER USER")
    stop = threading.Event()

    updates = {"n": 0}

    def counted_churn() -> None:
        rnd = random.Random(7)
        with psycopg.connect(shop["db"], autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("UPDATE products SET v = v + 1 WHERE id = %s",
                             (rnd.randint(1, 3000),))
                updates["n"] += 1

    t = threading.Thread(target=counted_churn)
    t.start()
    res = dx("snapshot", "public.products", "-c", str(shop["config"]), "--chunk", "500")
    stop.set()
    t.join()
    assert res.returncode == 0, res.stderr
    with psycopg.connect(shop["db"]) as conn:
        final = dict(conn.execute("SELECT id, v FROM products").fetchall())
        pending = conn.execute("SELECT count(*) FROM dx.outbox").fetchone()[0]  # type: ignore[index]
    if shop["mode"] == "logical":  # the stream has the inserts, every update, the snapshot
        pending = 3000 + updates["n"] + 3000
    reader = TopicReader(stack, shop["topic"])
    with relay_thread(shop["config"]):
        events = reader.read(until=pending, timeout_s=90, settle_s=1.0)
    reader.close()
    state: dict[int, int] = {}
    for e in events:
        assert e.key is not None and e.value is not None
        state[e.key["id"]] = e.value["after"]["v"]
    ops = {op: sum(1 for e in events if e.value and e.value["op"] == op) for op in "ru"}
    assert len(state) == len(final), (len(events), pending, ops, res.stdout[-300:])
    assert state == final
    assert sum(1 for e in events if e.value and e.value["op"] == "r") == 3000
