"""Writes capture cannot see: sessions under ``session_replication_role = replica`` (pg_restore,
ETL tools) are captured, because dx's triggers fire ALWAYS; a dx trigger someone disabled, or
set back to PostgreSQL's default (which skips replica-role sessions), is reported by
``dx capture status`` (exit 1) and by the running relay: a warning line, the
``dx_capture_inactive_triggers`` gauge and the ``/readyz`` reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from tests.faults.oracle import compare, topic_facts, wait_drained
from tests.integration.relay_support import captured_items, dx
from tests.integration.test_sink_support import wait_for
from tests.integration.test_worker_observability import (
    dx_process,
    free_port,
    get,
    scrape,
    status_code,
    stop,
    value,
)


def _replica_role_writes(url: str) -> list[tuple[int, int]]:
    """What pg_restore --data-only and ETL tools do: triggers and foreign keys "off"."""
    with psycopg.connect(url) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO items (id, v) VALUES (1, 10), (2, 20), (3, 30)")
        conn.execute("UPDATE items SET v = 11 WHERE id = 1")
    return [(1, 10), (2, 20), (3, 30), (1, 11)]


def test_replica_role_writes_are_captured_and_a_disabled_trigger_is_reported(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    cfg = captured_items(stack, pg_db, topic_prefix, tmp_path)
    committed = _replica_role_writes(pg_db)
    res = dx("capture", "status", "-c", str(cfg))
    assert res.returncode == 0, res.stdout + res.stderr

    port = free_port()
    relay = dx_process("relay", "-c", str(cfg), port=port)
    try:
        wait_drained(pg_db)
        got = topic_facts(stack, f"{topic_prefix}.public.items", len(committed))
        verdict = compare("replica-role writes", committed, got)
        assert verdict.lost == 0 and verdict.dup == 0

        with psycopg.connect(pg_db, autocommit=True) as conn:
            conn.execute("ALTER TABLE items DISABLE TRIGGER dx_capture")
        res = dx("capture", "status", "-c", str(cfg))
        assert res.returncode == 1
        assert "trigger dx_capture on public.items is disabled: changes to public.items are " \
               "not captured" in res.stdout, res.stdout
        lbl = {"relay": topic_prefix}
        wait_for(lambda: value(scrape(port), "dx_capture_inactive_triggers", **lbl) == 1, 60,
                 what="the relay to count the disabled trigger")
        ready = get(port, "/readyz")
        assert ready is not None and ready.status_code == 200
        assert "capture incomplete: trigger dx_capture on public.items is disabled" in \
            ready.json()["reason"]

        # set back to PostgreSQL's default: fires for ordinary sessions only
        with psycopg.connect(pg_db, autocommit=True) as conn:
            conn.execute("ALTER TABLE items ENABLE TRIGGER dx_capture")
        res = dx("capture", "status", "-c", str(cfg))
        assert res.returncode == 1
        assert "session_replication_role = replica" in res.stdout, res.stdout

        res = dx("capture", "install", "-c", str(cfg))
        assert res.returncode == 0, res.stderr
        assert dx("capture", "status", "-c", str(cfg)).returncode == 0
        wait_for(lambda: value(scrape(port), "dx_capture_inactive_triggers", **lbl) == 0, 60,
                 what="the relay to see capture whole again")
        assert status_code(port, "/readyz") == 200
    finally:
        err = stop(relay)
    assert "capture incomplete: trigger dx_capture on public.items is disabled" in err
