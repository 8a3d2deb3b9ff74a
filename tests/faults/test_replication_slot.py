"""Slot safety (logical capture), on a PostgreSQL of the tier's own (checkpoints and
``max_slot_wal_keep_size`` are cluster-wide).

A stopped relay makes PostgreSQL keep WAL for its slot: the relay's metrics say how much
(``dx_capture_slot_retained_bytes``, the age of the last confirm), the ``replication_slot`` alert
of ``dx alerts run`` fires past its threshold (no relay need run for that) and resolves once a
relay reads the slot again. Down long enough to pass ``max_slot_wal_keep_size``, the slot is
invalidated: the relay stops with one line naming the runbook, ``dx status`` and the alert say
so, never a silent gap; the runbook (capture install, snapshot, ``--reset-state``) brings every
row's current state to Kafka."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry

from pipeline.alerts.engine import AlertEngine
from pipeline.config.alerts import AlertsConfig, RulesConfig
from pipeline.config.loader import load_config
from pipeline.observability.metrics import DxMetrics
from pipeline.observability.server import WorkerServer
from pipeline.relay.observe import RelayObserver
from tests.faults.oracle import compare, topic_facts
from tests.faults.own_postgres import OwnPostgres
from tests.integration.relay_support import TopicReader, dx, execute, relay_thread, write_config
from tests.integration.test_relay_resilience import ITEMS, TABLES
from tests.integration.test_sink_support import wait_for


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


#: the alert threshold above what a running relay's slot keeps
THRESHOLD = 32 * 2**20


def _next_segments(url: str, n: int) -> None:
    """Write a little and move the WAL on by ``n`` segments (16 MB each)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS filler (b text)")
        for _ in range(n):
            conn.execute("INSERT INTO filler SELECT repeat('x', 1000) "
                         "FROM generate_series(1, 2000)")
            conn.execute("SELECT pg_switch_wal()")


def _checkpoint(url: str) -> None:
    """Also logs the running transactions, which lets a confirmed slot release WAL at once."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def test_retained_wal_alerts_and_an_invalidated_slot_stops_the_relay(
        stack: Any, own_postgres: OwnPostgres, topic_prefix: str, tmp_path: Path) -> None:
    db = own_postgres.database(f"slot_{uuid.uuid4().hex[:8]}")
    execute(db, ITEMS)
    cfg = write_config(tmp_path / "dx.yaml", stack, db, topic_prefix, TABLES,
                       capture_mode="logical")
    assert dx("capture", "install", "-c", str(cfg)).returncode == 0
    config = load_config(cfg)
    registry = CollectorRegistry()
    observer = RelayObserver(config, WorkerServer(0), metrics=DxMetrics(registry))
    labels = {"relay": config.relay.name}

    def retained() -> float:
        observer.sample()
        value = registry.get_sample_value("dx_capture_slot_retained_bytes", labels)
        assert value is not None, "no slot metric"
        return value

    engine = AlertEngine(config, AlertsConfig(rules=RulesConfig(
        dead_tasks=None, backlog_age_s=None, target_down=False, slot_retained_bytes=THRESHOLD,
        slot_confirm_age_s=None)))
    topic = f"{topic_prefix}.public.items"
    execute(db, "INSERT INTO items (id, v) VALUES (1, 1)")
    reader = TopicReader(stack, topic)
    with relay_thread(cfg):
        assert len(reader.read(until=1)) == 1
    assert retained() < THRESHOLD
    assert registry.get_sample_value("dx_capture_slot_confirm_age_seconds", labels) is not None
    assert engine.evaluate_once() == []

    # the relay is down, the shop writes on (into a table dx does not capture: the slot keeps
    # the WAL all the same)
    _next_segments(db, 3)
    assert retained() >= THRESHOLD
    fired = engine.evaluate_once()
    assert len(fired) == 1 and fired[0].startswith("FIRING replication_slot"), fired
    assert "is the relay running?" in fired[0]
    assert engine.evaluate_once() == []  # one notification per incident

    # a relay reads the slot again and confirms it: the WAL is released, the incident resolves
    execute(db, "INSERT INTO items (id, v) VALUES (2, 2)")
    with relay_thread(cfg):
        assert len(reader.read(until=2)) == 2

        def resolved() -> list[str]:
            _checkpoint(db)
            return engine.evaluate_once()
        (line,) = wait_for(resolved, 60, interval=1,
                           what="the replication_slot incident to resolve")
        assert line.startswith("RESOLVED replication_slot"), line
        assert retained() < THRESHOLD
    reader.close()
    observer.close()

    # the relay is down; the shop writes on, past what PostgreSQL may keep for the slot
    _set_keep_size(own_postgres.url, "1MB")
    try:
        execute(db, "INSERT INTO items (id, v) VALUES (3, 3)", "UPDATE items SET v = 10 "
                "WHERE id = 1")
        _next_segments(db, 3)
        _checkpoint(db)  # removes the segments past the limit: the slot is invalidated
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
    fired = engine.evaluate_once()
    assert len(fired) == 1 and "was invalidated" in fired[0], fired

    # the runbook: a new slot (the invalidated one is replaced), a snapshot, a reset start
    install = dx("capture", "install", "-c", str(cfg))
    assert install.returncode == 0 and "created" in install.stdout, install.stdout
    assert dx("snapshot", "public.items", "-c", str(cfg)).returncode == 0
    with relay_thread(cfg, reset_state=True):
        got = topic_facts(stack, topic, 5)
    with psycopg.connect(db) as conn:
        current = [(int(r[0]), int(r[1])) for r in conn.execute("SELECT id, v FROM items")]
    # consumers converge on the current state: the changes made while the slot was lost arrive
    # as snapshot rows, after what was published before
    verdict = compare("slot invalidated, runbook followed", [(1, 1), (2, 2), (3, 3), (1, 10)],
                      got)
    assert sorted(current) == [(1, 10), (2, 2), (3, 3)]
    assert verdict.lost == 0 and verdict.dup == 1  # (2, 2) again: the snapshot re-sends it
    resolved = engine.evaluate_once()
    assert len(resolved) == 1 and resolved[0].startswith("RESOLVED"), resolved
