"""Slot safety (logical capture): a stopped relay makes PostgreSQL keep WAL for its slot. The
relay's metrics say how much (``dx_capture_slot_retained_bytes``, and the age of the last
confirm), and the ``replication_slot`` alert rule of ``dx alerts run`` fires once the WAL kept
passes its threshold (no relay need run for that) and resolves when a relay reads the slot
again."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from pipeline.alerts.engine import AlertEngine
from pipeline.config.alerts import AlertsConfig, RulesConfig
from pipeline.config.loader import load_config
from pipeline.observability.metrics import DxMetrics
from pipeline.observability.server import WorkerServer
from pipeline.relay.observe import RelayObserver
from tests.integration.relay_support import TopicReader, captured_items, execute, relay_thread

#: WAL written while the relay is stopped, and the alert threshold above what a running relay
#: keeps (on a shared cluster that is a few MB: other databases write too)
FILL_MB, THRESHOLD_MB = 48, 32


def test_retained_wal_is_a_metric_and_an_alert_that_resolves(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    cfg_path = captured_items(stack, pg_db, topic_prefix, tmp_path, capture_mode="logical")
    cfg = load_config(cfg_path)
    registry = CollectorRegistry()
    observer = RelayObserver(cfg, WorkerServer(0), metrics=DxMetrics(registry))
    labels = {"relay": cfg.relay.name}

    def retained() -> float:
        observer.sample()
        value = registry.get_sample_value("dx_capture_slot_retained_bytes", labels)
        assert value is not None, "no slot metric"
        return value

    reader = TopicReader(stack, f"{topic_prefix}.public.items")
    execute(pg_db, "INSERT INTO items VALUES (1, 1)")
    with relay_thread(cfg_path):
        assert len(reader.read(until=1)) == 1
    baseline = retained()
    assert registry.get_sample_value("dx_capture_slot_confirm_age_seconds", labels) is not None

    threshold = int(baseline) + THRESHOLD_MB * 2**20
    engine = AlertEngine(cfg, AlertsConfig(rules=RulesConfig(
        dead_tasks=None, backlog_age_s=None, target_down=False,
        slot_retained_bytes=threshold, slot_confirm_age_s=None)))
    assert engine.evaluate_once() == []

    # the relay is down; the shop keeps writing (a table dx does not capture: the WAL is kept
    # all the same, the slot cannot tell)
    execute(pg_db, "CREATE TABLE filler (b text)",
            f"INSERT INTO filler SELECT repeat(md5(g::text), 32) "
            f"FROM generate_series(1, {FILL_MB * 1024}) g")
    assert retained() >= baseline + FILL_MB * 2**20
    fired = engine.evaluate_once()
    assert len(fired) == 1 and fired[0].startswith("FIRING replication_slot"), fired
    assert "is the relay running?" in fired[0]
    assert engine.evaluate_once() == []  # one notification per incident

    # a relay reads the slot again and confirms it: the WAL is released, the incident resolves
    execute(pg_db, "INSERT INTO items VALUES (2, 2)")
    resolved: list[str] = []
    with relay_thread(cfg_path):
        assert len(reader.read(until=2)) == 2
        deadline = time.monotonic() + 120
        while not resolved and time.monotonic() < deadline:
            resolved = engine.evaluate_once()
            time.sleep(1)
    reader.close()
    observer.close()
    assert len(resolved) == 1 and resolved[0].startswith("RESOLVED replication_slot"), resolved
    assert retained() < threshold
