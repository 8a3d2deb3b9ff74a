"""PostgreSQL restarted (cleanly, then crashed) under a running relay and a writing application,
on an instance of the tier's own: the relay exits with one line naming PostgreSQL, is restarted
the way an orchestrator would, and every committed change arrives exactly once."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from tests.faults.oracle import compare, topic_facts, wait_drained
from tests.faults.own_postgres import OwnPostgres
from tests.faults.supervisor import Supervisor
from tests.integration.relay_support import dx, execute, write_config
from tests.integration.test_relay_resilience import ITEMS, TABLES


def write_through(url: str, stop: threading.Event, committed: list[tuple[int, int]]) -> None:
    """Inserts one row per transaction through restarts; a commit whose answer was lost is
    counted if the row is there afterwards."""
    conn: psycopg.Connection[Any] | None = None
    i = 0
    while not stop.is_set():
        i += 1
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(url, autocommit=True, connect_timeout=2)
            conn.execute("INSERT INTO items (id, v) VALUES (%s, %s)", (i, i))
            committed.append((i, i))
        except psycopg.OperationalError:
            conn = None
            while not stop.is_set():
                try:
                    with psycopg.connect(url, connect_timeout=2) as check:
                        if check.execute("SELECT 1 FROM items WHERE id = %s", (i,)).fetchone():
                            committed.append((i, i))
                    break
                except psycopg.OperationalError:
                    time.sleep(0.2)
        time.sleep(0.005)
    if conn is not None:
        conn.close()


def test_postgres_restart_and_crash_under_the_relay(stack: Any, own_postgres: OwnPostgres,
                                                    topic_prefix: str, tmp_path: Path) -> None:
    db = own_postgres.database(f"restart_{uuid.uuid4().hex[:8]}")
    execute(db, ITEMS)
    cfg = write_config(tmp_path / "dx.yaml", stack, db, topic_prefix, TABLES)
    assert dx("capture", "install", "-c", str(cfg)).returncode == 0
    supervisor = Supervisor("relay", "-c", str(cfg))
    committed: list[tuple[int, int]] = []
    stop = threading.Event()
    writer = threading.Thread(target=write_through, args=(db, stop, committed))
    writer.start()
    try:
        for mode in ("fast", "immediate"):
            time.sleep(3)
            own_postgres.stop(mode)
            time.sleep(1)
            own_postgres.start()
        time.sleep(2)
        stop.set()
        writer.join()
        wait_drained(db, timeout_s=120)
    finally:
        stop.set()
        supervisor.stop()
    for code, line in supervisor.exits:
        print(f"relay exit {code}: {line}", flush=True)
    failures = [line for code, line in supervisor.exits[:-1] if code != 0]
    assert failures and all(line.startswith("dx: error:") and "postgresql" in line
                            for line in failures), supervisor.exits
    got = topic_facts(stack, f"{topic_prefix}.public.items", len(committed), timeout_s=90)
    verdict = compare("postgresql restart + crash under the relay", committed, got)
    assert verdict.lost == 0 and verdict.dup == 0
