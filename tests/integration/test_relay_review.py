"""Regressions for the capture/relay review: a commit number drawn early fails closed, an early
drawer does not stall other committers, a Kafka cursor ahead of the database is refused (not
trusted), and a record too large for Kafka names its outbox row."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline.config.loader import load_config
from pipeline.relay.runner import Relay
from tests.integration.relay_support import TopicReader, dx, execute, relay_thread, write_config
from tests.integration.test_relay_failures import one_error_line

TABLES = "  - name: items\n    columns: [id, v, note]\n"


@pytest.fixture
def items(stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> Path:
    execute(pg_db, "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0, note text)")
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, TABLES)
    res = dx("capture", "install", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    return cfg


def test_capture_after_set_constraints_immediate_fails_closed(items: Path, pg_db: str) -> None:
    with psycopg.connect(pg_db) as conn:
        conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
        conn.execute("INSERT INTO items (id) VALUES (1)")  # draws the commit number now
        with pytest.raises(psycopg.errors.RaiseException, match="already drew its commit"):
            conn.execute("INSERT INTO items (id) VALUES (2)")


def test_an_early_drawer_holds_back_only_the_relay_not_other_committers(
        stack: Any, items: Path, pg_db: str, topic_prefix: str) -> None:
    early = psycopg.connect(pg_db)
    early.execute("SET CONSTRAINTS ALL IMMEDIATE")
    early.execute("INSERT INTO items (id, v) VALUES (1, 1)")  # holds the shared commit lock
    reader = TopicReader(stack, f"{topic_prefix}.public.items")
    try:
        with relay_thread(items):
            # other writers keep committing while the relay keeps asking for the frontier; a
            # statement_timeout turns "stuck behind the relay's lock request" into a failure
            with psycopg.connect(pg_db, autocommit=True) as conn:
                conn.execute("SET statement_timeout = '10s'")
                for i in range(2, 40):
                    conn.execute("INSERT INTO items (id, v) VALUES (%s, %s)", (i, i))
            early.commit()
            events = reader.read(until=39, settle_s=1.0)
    finally:
        early.close()
        reader.close()
    assert sorted(e.key["id"] for e in events if e.key) == list(range(1, 40))


def test_a_kafka_cursor_ahead_of_the_database_is_refused_then_reset(
        stack: Any, items: Path, pg_db: str, topic_prefix: str) -> None:
    for i in range(1, 21):  # 20 transactions: the cursor ends at commit number 20
        execute(pg_db, f"INSERT INTO items (id) VALUES ({i})")
    reader = TopicReader(stack, f"{topic_prefix}.public.items")
    with relay_thread(items):
        reader.read(until=20)
    # a restore to before those commits: the sequence goes back, the Kafka cursor does not
    execute(pg_db, "SELECT setval('dx.commit_seq', 1)")
    execute(pg_db, "INSERT INTO items (id) VALUES (100)", "UPDATE items SET v = 1 WHERE id = 1")
    line = one_error_line(dx("relay", "-c", str(items), timeout=90))
    assert "is ahead of this database's commit sequence" in line and "--reset-state" in line
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT count(*) FROM dx.outbox").fetchone() == (2,)  # kept
    relay = Relay(load_config(items), reset_state=True)
    t = threading.Thread(target=relay.run)
    t.start()
    try:
        events = reader.read(until=22, settle_s=1.0)
    finally:
        relay.stop.set()
        t.join(60)
        reader.close()
    tail = [(e.key["id"], e.value["op"]) for e in events[20:] if e.key and e.value]
    assert tail == [(100, "c"), (1, "u")]


@pytest.mark.parametrize("mode", ["exactly-once", "at-least-once"])
def test_a_record_too_large_for_kafka_names_its_row(stack: Any, pg_db: str, topic_prefix: str,
                                                    tmp_path: Path, mode: str) -> None:
    execute(pg_db, "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0, note text)")
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, TABLES, mode=mode)
    assert dx("capture", "install", "-c", str(cfg)).returncode == 0
    execute(pg_db, "INSERT INTO items (id) VALUES (1)",
            "INSERT INTO items (id, note) SELECT 2, string_agg(md5(g::text), '') "
            "FROM generate_series(1, 70000) g")  # ~2.2 MB: above message.max.bytes (1 MB)
    execute(pg_db, "INSERT INTO items (id) VALUES (3)")
    line = one_error_line(dx("relay", "-c", str(cfg), timeout=120))
    assert 'key {"id": 2}' in line
    assert "larger than Kafka accepts" in line and "dx outbox quarantine" in line
    position = line.split("dx outbox quarantine ")[1].strip("'")
    assert dx("outbox", "quarantine", position, "-r", "too big", "-c", str(cfg)).returncode == 0
    reader = TopicReader(stack, f"{topic_prefix}.public.items")
    with relay_thread(cfg):
        events = reader.read(until=2, settle_s=1.0)
    reader.close()
    assert sorted({e.key["id"] for e in events if e.key}) == [1, 3]  # ALO may repeat 1
