"""What only logical capture has: values decoded from the WAL equal trigger capture's, the slot's
safety (a missing or re-created slot stops the relay with one line, never a silent gap), and
install/status of the publication."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import fastavro
import psycopg
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from psycopg.types.json import set_json_loads

from pipeline.capture.catalog import read_table
from pipeline.config.loader import load_config
from pipeline.db import json_loads_exact
from pipeline.errors import SchemaError, ServiceUnavailable
from pipeline.events import avro
from tests.integration.relay_support import TopicReader, dx, execute, relay_thread, write_config

TYPES = """
CREATE TYPE mood AS ENUM ('calm', 'busy');
CREATE TABLE kinds (
    id bigint PRIMARY KEY, price numeric(10,2), amount numeric, ratio float8, ok bool,
    name text, at timestamptz, local timestamp, day date, clock time, uid uuid, raw bytea,
    doc jsonb, tags text[], nums int4[], span interval, feel mood, hidden text
);
"""
KINDS = """
  - name: kinds
    columns: [id, price, amount, ratio, ok, name, at, local, day, clock, uid, raw, doc, tags,
              nums, span, feel]
"""
ROW = """
INSERT INTO kinds VALUES (1, 12.5, 3.14159, 0.1, true, 'a "quoted", {braced} name',
    '2024-02-29 23:59:59.123456+02', '2024-02-29 01:02:03', '2024-02-29', '10:11:12.5',
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff', '{"b": 2, "a": [true, null]}',
    ARRAY['x', NULL, 'y,z', 'q"uote'], ARRAY[1, NULL, 3], '1 day 02:00:00', 'busy', 'secret')
"""


def _expected_after(db: str, cfg: Path, prefix: str) -> dict[str, Any]:
    """The row as trigger capture records it (jsonb of the exposed columns), through the
    converters, an Avro round trip and back: what a consumer must read in either mode,
    whatever the type mapping is."""
    with psycopg.connect(db) as conn:
        set_json_loads(json_loads_exact, conn)
        spec = read_table(conn, load_config(cfg), 0)
        row = conn.execute("SELECT to_jsonb(k) - 'hidden' FROM kinds k").fetchone()
    assert row is not None
    record = avro.value_schema(spec, prefix)["fields"][0]["type"][1]
    parsed = fastavro.parse_schema(record)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, avro.row_converter(spec.columns)(row[0]))
    buf.seek(0)
    return fastavro.schemaless_reader(buf, parsed)  # type: ignore[no-any-return,call-arg]


def test_values_are_the_same_in_both_modes(stack: Any, pg_db: str, topic_prefix: str,
                                           tmp_path: Path, capture_mode: str) -> None:
    """The same row, captured either way, reads back as the same values (both compared with
    what trigger capture records); the hidden column never leaves; an update of it alone
    emits nothing; a key change is delete, tombstone, create."""
    execute(pg_db, TYPES)
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, KINDS,
                       capture_mode=capture_mode)
    res = dx("capture", "install", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    execute(pg_db, ROW)
    expected = _expected_after(pg_db, cfg, topic_prefix)
    execute(pg_db, "UPDATE kinds SET hidden = 'still secret'", "UPDATE kinds SET ok = false",
            "UPDATE kinds SET id = 2")
    reader = TopicReader(stack, f"{topic_prefix}.public.kinds")
    with relay_thread(cfg):
        events = reader.read(until=5, settle_s=1.0)
    reader.close()
    ops = [e.value["op"] if e.value else None for e in events]
    assert ops == ["c", "u", "d", None, "c"]
    after = events[0].value["after"]  # type: ignore[index]
    assert "hidden" not in after
    assert after == expected
    assert after["name"] == 'a "quoted", {braced} name'
    assert after["tags"] == ["x", None, "y,z", 'q"uote'] and after["nums"] == [1, None, 3]
    assert events[1].value["before"] == after  # type: ignore[index]
    assert events[4].value["after"]["id"] == 2  # type: ignore[index]


@pytest.fixture
def logical_items(stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> Path:
    execute(pg_db, "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: items\n    columns: [id, v]\n", capture_mode="logical")
    res = dx("capture", "install", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "replication slot" in res.stdout and "created" in res.stdout
    return cfg


def _slot(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT slot_name FROM pg_replication_slots "
                           "WHERE database = current_database()").fetchone()
    assert row is not None
    return str(row[0])


def test_install_status_and_a_lost_slot(stack: Any, pg_db: str, topic_prefix: str,
                                        logical_items: Path) -> None:
    cfg = logical_items
    status = dx("capture", "status", "-c", str(cfg))
    assert status.returncode == 0, status.stdout + status.stderr
    assert "capture mode: logical" in status.stdout and "logical" in status.stdout
    with psycopg.connect(pg_db) as conn:
        ident = conn.execute("SELECT relreplident FROM pg_class WHERE relname = 'items'"
                             ).fetchone()
        triggers = [r[0] for r in conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'items'::regclass")]
    assert ident == ("f",) and triggers == ["dx_refuse_truncate"]
    # drift: the table left REPLICA IDENTITY FULL
    execute(pg_db, "ALTER TABLE items REPLICA IDENTITY DEFAULT")
    drift = dx("capture", "status", "-c", str(cfg))
    assert drift.returncode == 1 and "REPLICA IDENTITY is not FULL" in drift.stdout
    assert dx("capture", "install", "-c", str(cfg)).returncode == 0

    # one change delivered, so Kafka's state belongs to this slot
    execute(pg_db, "INSERT INTO items VALUES (1, 1)")
    reader = TopicReader(stack, f"{topic_prefix}.public.items")
    with relay_thread(cfg):
        assert len(reader.read(until=1)) == 1
    st = json.loads(dx("status", "-c", str(cfg), "--json").stdout)
    assert st["relay"]["capture_mode"] == "logical"
    assert st["relay"]["slot"]["retained_bytes"] is not None

    # the slot is lost (fail-over, max_slot_wal_keep_size): one line, no silent gap
    execute(pg_db, f"SELECT pg_drop_replication_slot('{_slot(pg_db)}')")
    execute(pg_db, "INSERT INTO items VALUES (2, 2)")  # never read: the slot is gone
    res = dx("relay", "-c", str(cfg), timeout=60)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "runbook" in lines[0], lines
    st = json.loads(dx("status", "-c", str(cfg), "--json").stdout)
    assert any("is missing" in p for p in st["relay"]["problems"])

    # the runbook: install creates a new slot (a new epoch); the relay refuses to go on from
    # the old slot's position until told, after a re-snapshot
    assert dx("capture", "install", "-c", str(cfg)).returncode == 0
    res = dx("relay", "-c", str(cfg), timeout=60)
    assert res.returncode == 1 and "created again" in res.stderr, res.stderr
    snap = dx("snapshot", "public.items", "-c", str(cfg))
    assert snap.returncode == 0, snap.stderr
    with relay_thread(cfg, reset_state=True):
        events = reader.read(until=3, settle_s=1.0)
    reader.close()
    assert [(e.key["id"], e.value["op"]) for e in events[1:]  # type: ignore[index]
            ] == [(1, "r"), (2, "r")]


def test_an_incompatible_column_change_stops_the_relay_with_one_line(
        stack: Any, pg_db: str, topic_prefix: str, logical_items: Path) -> None:
    """A type change arrives as a relation message: a new schema version, checked against the
    registry like any other; refused, the relay stops there and publishes nothing after it."""
    reader = TopicReader(stack, f"{topic_prefix}.public.items")
    execute(pg_db, "INSERT INTO items VALUES (1, 1)")
    with pytest.raises(SchemaError, match="not compatible"), relay_thread(logical_items):
        assert len(reader.read(until=1)) == 1
        execute(pg_db, "ALTER TABLE items ALTER COLUMN v TYPE text",
                "UPDATE items SET v = 'x' WHERE id = 1")
        reader.read(until=2, timeout_s=10)
    assert len(reader.events) == 1
    reader.close()
    res = dx("relay", "-c", str(logical_items), timeout=60)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "not compatible" in lines[0], lines


def test_compatible_column_changes_become_schema_versions_while_the_relay_runs(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    """Relation messages in the stream, with the relay running: a type change the registry
    accepts (int -> bigint) and a dropped exposed column each become a new schema version
    (registered like any other, the event after them carries it); adding or dropping a column
    dx.yaml does not expose changes nothing on the topic."""
    execute(pg_db, "CREATE TABLE things (id int PRIMARY KEY, v int NOT NULL, n int, note text)")
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: things\n    columns: [id, v, n]\n", capture_mode="logical")
    assert dx("capture", "install", "-c", str(cfg)).returncode == 0
    topic = f"{topic_prefix}.public.things"
    reader = TopicReader(stack, topic)
    with relay_thread(cfg) as relay:
        execute(pg_db, "INSERT INTO things VALUES (1, 1, 1, 'a')")
        reader.read(until=1)
        execute(pg_db, "ALTER TABLE things ALTER COLUMN v TYPE bigint",
                "UPDATE things SET v = 5000000000 WHERE id = 1")
        reader.read(until=2)
        execute(pg_db, "ALTER TABLE things DROP COLUMN n", "UPDATE things SET v = 3 WHERE id = 1")
        reader.read(until=3)
        execute(pg_db, "ALTER TABLE things DROP COLUMN note",
                "ALTER TABLE things ADD COLUMN extra text",
                "UPDATE things SET v = 4, extra = 'x' WHERE id = 1")
        events = reader.read(until=4, settle_s=1.0)
        assert relay.stats.state == "active"
    reader.close()
    afters = [e.value["after"] for e in events]  # type: ignore[index]
    assert afters == [{"id": 1, "v": 1, "n": 1}, {"id": 1, "v": 5000000000, "n": 1},
                      {"id": 1, "v": 3}, {"id": 1, "v": 4}]
    registry = SchemaRegistryClient({"url": stack.schema_registry_url})
    assert len(registry.get_versions(f"{topic}-value")) == 3  # int, bigint, without n
    with psycopg.connect(pg_db) as conn:
        versions = conn.execute("SELECT count(*) FROM dx.capture_spec "
                                "WHERE entity = 'public.things'").fetchone()
    assert versions == (3,)


def test_a_truncate_past_the_guard_is_reported(stack: Any, pg_db: str, topic_prefix: str,
                                               logical_items: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """With the TRUNCATE guard disabled (it fires ALWAYS, under session_replication_role =
    replica too) the stream still carries the truncate, and the relay says so (one error line
    naming the table)."""
    execute(pg_db, "INSERT INTO items VALUES (1, 1)")
    execute(pg_db, "ALTER TABLE items DISABLE TRIGGER dx_refuse_truncate", "TRUNCATE items",
            "ALTER TABLE items ENABLE ALWAYS TRIGGER dx_refuse_truncate",
            "INSERT INTO items VALUES (2, 2)")
    reader = TopicReader(stack, f"{topic_prefix}.public.items")
    with relay_thread(logical_items):
        assert len(reader.read(until=2)) == 2
    reader.close()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "public.items was truncated" in errors[0], errors


def test_partitioned_table_under_its_own_name(stack: Any, pg_db: str, topic_prefix: str,
                                              tmp_path: Path) -> None:
    """Changes written through a partition arrive as the partitioned table's (the publication
    publishes via the root); every partition gets REPLICA IDENTITY FULL and the guard."""
    execute(pg_db, "CREATE TABLE orders (id int, region text, v int, PRIMARY KEY (id, region)) "
                   "PARTITION BY LIST (region)",
            "CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu')",
            "CREATE TABLE orders_us PARTITION OF orders FOR VALUES IN ('us')")
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: orders\n    columns: [id, region, v]\n",
                       capture_mode="logical")
    assert dx("capture", "install", "-c", str(cfg)).returncode == 0
    execute(pg_db, "INSERT INTO orders VALUES (1, 'eu', 1), (2, 'us', 1)",
            "UPDATE orders_eu SET v = 2 WHERE id = 1")
    reader = TopicReader(stack, f"{topic_prefix}.public.orders")
    with relay_thread(cfg):
        events = reader.read(until=3, settle_s=0.5)
    reader.close()
    assert [(e.key["id"], e.value["op"]) for e in events  # type: ignore[index]
            ] == [(1, "c"), (2, "c"), (1, "u")]
    assert events[2].value["before"]["v"] == 1  # type: ignore[index]
    with psycopg.connect(pg_db) as conn:
        idents = dict(conn.execute("SELECT relname, relreplident FROM pg_class "
                                   "WHERE relname LIKE 'orders_%%' AND relkind = 'r'"))
        guarded = {r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "WHERE t.tgname = 'dx_refuse_truncate'")}
    assert idents == {"orders_eu": "f", "orders_us": "f"}
    assert guarded == {"orders", "orders_eu", "orders_us"}


def test_a_replication_connection_lost_while_running_stops_the_relay(
        stack: Any, pg_db: str, topic_prefix: str, logical_items: Path) -> None:
    """The slot is read on a thread of its own (pipeline/relay/pump.py): an error there ends
    the relay with that error, as one on the relay's own thread would, never a silent stall;
    a restart delivers what came after, once."""
    reader = TopicReader(stack, f"{topic_prefix}.public.items")
    execute(pg_db, "INSERT INTO items VALUES (1, 1)")
    with pytest.raises(ServiceUnavailable, match="replication"), \
            relay_thread(logical_items) as relay:
        assert len(reader.read(until=1)) == 1
        execute(pg_db, "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                       "WHERE database = current_database()")
        deadline = time.monotonic() + 60
        while relay.stats.state != "stopped" and time.monotonic() < deadline:
            time.sleep(0.05)
    execute(pg_db, "INSERT INTO items VALUES (2, 2)")
    with relay_thread(logical_items):
        events = reader.read(until=2, settle_s=1.0)
    reader.close()
    assert [e.key["id"] for e in events] == [1, 2]  # type: ignore[index]
