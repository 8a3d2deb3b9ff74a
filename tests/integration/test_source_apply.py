"""Source workers against the real stack: bad events fail alone with reasons while good ones
land, conflicting updates resolve by policy whatever the arrival order, deletes and envelopes,
the origin tag capture relies on."""

from __future__ import annotations

import io
import json
import random
import signal
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import psycopg
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from pipeline.tasks.store import TaskFilter, TaskStore
from tests.integration.test_source_support import (
    create_topic,
    produce,
    read_raw,
    run_worker,
    tasks,
    worker_process,
    write_config,
)

pytestmark = pytest.mark.integration

SCHEMA = """
CREATE TABLE cats (id int PRIMARY KEY);
INSERT INTO cats VALUES (1), (2);
CREATE TABLE items (
    id int PRIMARY KEY, name varchar(12) NOT NULL, price numeric(8,2), cat int REFERENCES cats,
    version bigint, seen_origin text
);
-- what capture will see: the transaction-local origin of every write
CREATE FUNCTION note_origin() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.seen_origin := current_setting('dx.origin', true); RETURN NEW; END $$;
CREATE TRIGGER note_origin BEFORE INSERT OR UPDATE ON items
    FOR EACH ROW EXECUTE FUNCTION note_origin();
"""


def setup_db(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(SCHEMA)  # type: ignore[arg-type]


def rows(url: str, q: str = "SELECT id, name, price, cat, version FROM items ORDER BY id"
         ) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(q).fetchall()  # type: ignore[arg-type]


def route_yaml(name: str, topic: str, extra: str = "", batch: int = 50) -> str:
    return f"""  - name: {name}
    topic: {topic}
    format: json
    origin: erp
    table: items
    columns: [id, name, price, cat, version]
    fields: {{title: name}}
    batch_size: {batch}
{extra}"""


def test_bad_events_fail_alone_and_good_ones_land(tmp_path: Path, stack: Any, pg_db: str,
                                                   topic_prefix: str) -> None:
    setup_db(pg_db)
    topic = f"{topic_prefix}.erp.items"
    create_topic(stack, topic)
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, route_yaml("erp-items", topic))
    good = [({"id": i}, {"id": i, "title": f"item {i}", "price": "9.99", "cat": 1})
            for i in range(1, 41)]
    bad: list[tuple[Any, Any]] = [
        ({"id": 100}, {"id": 100, "title": "x", "price": "cheap", "cat": 1}),   # wrong type
        ({"id": 101}, {"id": 101, "title": None, "cat": 1}),                    # null, NOT NULL
        ({"id": 102}, {"id": 102, "title": "x", "colour": "red"}),              # unknown field
        ({"id": 103}, {"id": 103, "title": "x", "cat": 99}),                    # missing FK
        ({"id": 104}, b"\x00\x01 not json"),                                    # undecodable
        ({"id": 105}, {"id": 105, "title": "far too long a name"}),             # length
    ]
    msgs = good[:15] + bad[:3] + good[15:30] + bad[3:] + good[30:]
    produce(stack, topic, msgs)

    stats = run_worker(cfg, "erp-items")

    assert (stats.applied, stats.failed) == (40, 6)
    got = rows(pg_db)
    assert [r[0] for r in got] == list(range(1, 41))
    assert {r for r in rows(pg_db, "SELECT DISTINCT seen_origin FROM items")} == {("erp",)}
    offsets = {i: off for off, (k, _) in enumerate(msgs) for i in [k["id"]]}
    dead = {off: (status, err) for off, status, err in tasks(pg_db, "erp-items")}
    assert {s for s, _ in dead.values()} == {"dead"}
    expect = {100: "field 'price': expected a number", 101: "field 'title': is null",
              102: "field 'colour': unknown field",
              103: "field 'cat': foreign_key_violation: cat refers to a row that does not exist",
              104: "undecodable: not JSON", 105: "field 'title': is 19 characters long"}
    for key, fragment in expect.items():
        assert fragment in dead[offsets[key]][1], (key, dead[offsets[key]])
    letters = read_raw(stack, f"{topic}.dlq", 6)
    assert sorted(int(dict(m.headers())["dx.dlq.offset"]) for m in letters) == \
        sorted(offsets[k] for k in expect)
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT next_offset FROM dx.source_offsets WHERE route = %s",
                            ("erp-items",)).fetchone() == (len(msgs),)

    # A restart resumes after the stored offset: nothing is applied or dead-lettered again.
    assert run_worker(cfg, "erp-items", idle_s=1.0).batches == 0
    assert len(tasks(pg_db, "erp-items")) == 6

    # Fix the missing parent, retry every dead task: the fixed one lands, the rest die again.
    with psycopg.connect(pg_db) as conn:
        conn.execute("INSERT INTO cats VALUES (99)")
        conn.commit()
        assert len(TaskStore(conn).retry(TaskFilter(route="erp-items"))) == 6
    run_worker(cfg, "erp-items", idle_s=1.5)
    assert [r[0] for r in rows(pg_db)] == [*range(1, 41), 103]
    with psycopg.connect(pg_db) as conn:
        after = dict(conn.execute('SELECT "offset", status || \' \' || attempts FROM dx.task '
                                  "WHERE route = 'erp-items'").fetchall())
    assert after.pop(offsets[103]) == "succeeded 2"
    assert set(after.values()) == {"dead 2"}


@pytest.mark.parametrize("policy", ["last-writer-wins", "reject-older"])
def test_conflicting_updates_resolve_by_version_in_any_order(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str, policy: str) -> None:
    setup_db(pg_db)
    conflict = f"    conflict: {{column: version, policy: {policy}}}\n"
    versions = list(range(1, 31))
    results = []
    for run in range(2):  # the same events in two different orders, each from a clean table
        with psycopg.connect(pg_db) as conn:
            conn.execute("TRUNCATE items")
        topic = f"{topic_prefix}.order{run}"
        create_topic(stack, topic)
        cfg = write_config(tmp_path / f"dx{run}.yaml", stack, pg_db,
                           route_yaml(f"r{run}", topic, conflict, batch=7))
        order = versions[:]
        random.Random(run).shuffle(order)
        msgs = [({"id": k}, {"id": k, "title": f"v{v}", "version": v})
                for v in order for k in (1, 2, 3)]
        produce(stack, topic, msgs)
        run_worker(cfg, f"r{run}")
        results.append(rows(pg_db))
        older = [t for t in tasks(pg_db, f"r{run}") if "older than" in t[2]]
        assert older, "out-of-order versions must be recorded, not dropped silently"
        assert {t[1] for t in older} == {"dead" if policy == "reject-older" else "skipped"}
    assert results[0] == results[1]
    assert results[0] == [(k, "v30", None, None, 30) for k in (1, 2, 3)]


def test_upsert_delete_with_envelopes_tombstones_and_partial_rows(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str) -> None:
    setup_db(pg_db)
    topic = f"{topic_prefix}.mixed"
    create_topic(stack, topic)
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db,
                       route_yaml("mixed", topic, "    mode: upsert+delete\n"))
    msgs: list[tuple[Any, Any]] = [
        ({"id": 1}, {"op": "c", "before": None, "after": {"id": 1, "title": "one", "cat": 1}}),
        ({"id": 1}, {"id": 1, "title": "one", "price": "5.00"}),      # partial: cat kept
        ({"id": 2}, {"id": 2, "title": "two"}),
        ({"id": 2}, None),                                           # tombstone
        ({"id": 3}, {"id": 3, "title": "three"}),
        ({"id": 3}, {"op": "d", "before": {"id": 3, "title": "three"}, "after": None}),
        ({"id": 3}, {"id": 3, "title": "again"}),                    # re-created after delete
        ({"id": 4}, {"id": 4, "title": "four", "__deleted": "false"}),
        ({"id": 9}, None),                                           # delete of nothing: fine
    ]
    produce(stack, topic, msgs)
    stats = run_worker(cfg, "mixed")
    assert (stats.applied, stats.failed, stats.skipped) == (9, 0, 0)
    assert rows(pg_db) == [(1, "one", pytest.approx(5), 1, None), (3, "again", None, None, None),
                           (4, "four", None, None, None)]


def test_avro_envelopes_through_the_registry(tmp_path: Path, stack: Any, pg_db: str,
                                             topic_prefix: str) -> None:
    """Debezium-style Avro envelopes (Confluent wire format) in upsert+delete mode; a message
    that is not Avro, and one whose schema id the registry does not know, fail alone."""
    setup_db(pg_db)
    topic = f"{topic_prefix}.avro.items"
    create_topic(stack, topic)
    row = {"type": "record", "name": "Value", "fields": [
        {"name": "id", "type": "int"},
        {"name": "title", "type": ["null", "string"], "default": None},
        {"name": "price", "type": ["null", {"type": "bytes", "logicalType": "decimal",
                                            "precision": 8, "scale": 2}], "default": None}]}
    envelope = {"type": "record", "name": "Envelope", "namespace": "erp.items", "fields": [
        {"name": "before", "type": ["null", row], "default": None},
        {"name": "after", "type": ["null", "Value"], "default": None},
        {"name": "op", "type": "string"},
        {"name": "ts_ms", "type": ["null", "long"], "default": None}]}
    registry = SchemaRegistryClient({"url": stack.schema_registry_url})
    sid = registry.register_schema(f"{topic}-value", Schema(json.dumps(envelope), "AVRO"))
    parsed = fastavro.parse_schema(envelope)

    def avro(value: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        buf.write(b"\x00" + int(sid).to_bytes(4, "big"))
        fastavro.schemaless_writer(buf, parsed, value)
        return buf.getvalue()

    def env(op: str, before: Any, after: Any) -> bytes:
        return avro({"before": before, "after": after, "op": op, "ts_ms": 1})

    produce(stack, topic, [
        (b"1", env("c", None, {"id": 1, "title": "one", "price": Decimal("1.50")})),
        (b"2", env("c", None, {"id": 2, "title": "two", "price": None})),
        (b"1", env("u", None, {"id": 1, "title": "uno", "price": Decimal("2.50")})),
        (b"3", b"plain text, not avro"),
        (b"4", b"\x00\x00\x0f\x42\x3f" + b"\x02"),  # schema id 999999
        (b"2", env("d", {"id": 2, "title": "two", "price": None}, None)),
        (b"2", None),
    ])
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, f"""  - name: erp-avro
    topic: {topic}
    format: avro
    table: items
    columns: [id, name, price]
    fields: {{title: name}}
    mode: upsert+delete
""")
    stats = run_worker(cfg, "erp-avro")
    assert (stats.applied, stats.failed) == (5, 2)
    assert rows(pg_db, "SELECT id, name, price, seen_origin FROM items") == [
        (1, "uno", Decimal("2.50"), "erp-avro")]
    reasons = [t[2] for t in tasks(pg_db, "erp-avro")]
    assert "not Confluent wire format" in reasons[0]
    assert "schema id 999999 is not in the registry" in reasons[1]


def test_sigterm_finishes_the_batch_in_hand(tmp_path: Path, stack: Any, pg_db: str,
                                            topic_prefix: str) -> None:
    setup_db(pg_db)
    topic = f"{topic_prefix}.term"
    create_topic(stack, topic)
    produce(stack, topic, [({"id": i}, {"id": i, "title": f"t{i}"}) for i in range(1, 20001)])
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, route_yaml("term", topic, batch=100))
    proc = worker_process(cfg, "term")
    with psycopg.connect(pg_db, autocommit=True) as conn:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            n = conn.execute("SELECT count(*) FROM items").fetchone()
            if n and n[0] > 0:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        count = conn.execute("SELECT count(*) FROM items").fetchone()
        stored = conn.execute("SELECT next_offset FROM dx.source_offsets").fetchone()
    assert count is not None and stored is not None
    assert count[0] > 0
    assert count[0] == stored[0]  # exactly the rows of the offsets it stored: no half batch
