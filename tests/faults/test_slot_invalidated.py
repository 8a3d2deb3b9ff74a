"""Logical capture with ``max_slot_wal_keep_size``: the relay is down long enough for PostgreSQL
to give up the WAL its slot needs (on a PostgreSQL of the tier's own: a small limit and a
checkpoint). The slot is invalidated: the relay stops with one line naming the runbook, ``dx
status`` and the ``replication_slot`` alert say so, never a silent gap; the runbook (capture
install, snapshot, ``--reset-state``) brings every row's current state to Kafka."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import psycopg

from pipeline.alerts.engine import AlertEngine
from pipeline.config.alerts import AlertsConfig, RulesConfig
from pipeline.config.loader import load_config
from tests.faults.oracle import compare, topic_facts
from tests.faults.own_postgres import OwnPostgres
from tests.integration.relay_support import TopicReader, dx, execute, relay_thread, write_config
from tests.integration.test_relay_resilience import ITEMS, TABLES


def _set_keep_size(url: str, value: str | None) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        if value is None:
            conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        else:
            conn.execute(f"ALTER SYSTEM SET max_slot_wal_keep_size = '{value}'")  # type: ignore[arg-type]
        conn.execute("SELECT pg_reload_conf()")


def _wal_status(url: str) -> str | None:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT wal_status FROM pg_replication_slots "
                           "WHERE database = current_database()").fetchone()
    return None if row is None else str(row[0])


def test_an_invalidated_slot_stops_the_relay_and_the_runbook_recovers(
        stack: Any, own_postgres: OwnPostgres, topic_prefix: str, tmp_path: Path) -> None:
    db = own_postgres.database(f"slot_{uuid.uuid4().hex[:8]}")
    execute(db, ITEMS)
    cfg = write_config(tmp_path / "dx.yaml", stack, db, topic_prefix, TABLES,
                       capture_mode="logical")
    assert dx("capture", "install", "-c", str(cfg)).returncode == 0
    topic = f"{topic_prefix}.public.items"
    execute(db, "INSERT INTO items (id, v) VALUES (1, 1)")
    reader = TopicReader(stack, topic)
    with relay_thread(cfg):
        assert len(reader.read(until=1)) == 1
    reader.close()

    # the relay is down; the shop writes on, past what PostgreSQL may keep for the slot
    _set_keep_size(own_postgres.url, "1MB")
    try:
        execute(db, "INSERT INTO items (id, v) VALUES (2, 2), (3, 3)", "UPDATE items SET v = 10 "
                "WHERE id = 1")
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("CREATE TABLE filler (b text)")
            for _ in range(3):  # three WAL segments on, then a checkpoint removes the old
                conn.execute("INSERT INTO filler SELECT repeat('x', 1000) "
                             "FROM generate_series(1, 2000)")
                conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
        assert _wal_status(db) == "lost"
    finally:
        _set_keep_size(own_postgres.url, None)

    res = dx("relay", "-c", str(cfg), timeout=60)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1, res.stdout + res.stderr
    assert len(lines) == 1 and "was invalidated" in lines[0] and "runbook" in lines[0], lines
    status = dx("status", "-c", str(cfg), "--json")
    assert status.returncode == 1
    assert any("was invalidated" in p for p in json.loads(status.stdout)["relay"]["problems"])
    engine = AlertEngine(load_config(cfg), AlertsConfig(rules=RulesConfig(
        dead_tasks=None, backlog_age_s=None, target_down=False)))
    fired = engine.evaluate_once()
    assert len(fired) == 1 and "was invalidated" in fired[0], fired

    # the runbook: a new slot (the invalidated one is replaced), a snapshot, a reset start
    install = dx("capture", "install", "-c", str(cfg))
    assert install.returncode == 0 and "created" in install.stdout, install.stdout
    assert dx("snapshot", "public.items", "-c", str(cfg)).returncode == 0
    with relay_thread(cfg, reset_state=True):
        got = topic_facts(stack, topic, 4)
    with psycopg.connect(db) as conn:
        current = [(int(r[0]), int(r[1])) for r in conn.execute("SELECT id, v FROM items")]
    # consumers converge on the current state; the changes made while the slot was lost arrive
    # as snapshot rows (the first insert, published before, is there twice: (1, 1) then (1, 10))
    verdict = compare("slot invalidated, runbook followed", [(1, 1), *current], got)
    assert (verdict.lost, verdict.dup) == (0, 0)
    resolved = engine.evaluate_once()
    assert len(resolved) == 1 and resolved[0].startswith("RESOLVED"), resolved
