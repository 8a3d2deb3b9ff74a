"""A transaction that drew its commit number early (``SET CONSTRAINTS ALL IMMEDIATE``) and stays
open holds back publication of later commits (they may not overtake it), but nobody's commit
waits for it: the relay watches the commit lock instead of queueing for it, so committers never
queue behind the relay. Commit latency is printed, not asserted; what is asserted is that no
commit-lock request ever waits, and that every change arrives exactly once, in commit order."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from pipeline.capture.ddl import COMMIT_LOCK
from tests.faults.oracle import compare, topic_facts, wait_drained
from tests.integration.relay_support import captured_items, execute, relay_thread

WAITING = """
SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objid = %s
  AND NOT granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def test_an_early_commit_number_makes_nobody_wait(stack: Any, pg_db: str, topic_prefix: str,
                                                  tmp_path: Path) -> None:
    cfg = captured_items(stack, pg_db, topic_prefix, tmp_path)
    waits: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        with psycopg.connect(pg_db, autocommit=True) as conn:
            while not sampling.is_set():
                row = conn.execute(WAITING, COMMIT_LOCK).fetchone()
                waits.append(int(row[0]) if row else 0)
                time.sleep(0.005)

    committed = [(0, 0), (1000, 1)]
    latencies: list[float] = []
    with relay_thread(cfg), psycopg.connect(pg_db) as early:
        execute(pg_db, "INSERT INTO items (id, v) VALUES (0, 0)")
        wait_drained(pg_db)  # the relay is running
        early.execute("INSERT INTO items (id, v) VALUES (1000, 1)")
        early.execute("SET CONSTRAINTS ALL IMMEDIATE")  # draws its commit number now
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with psycopg.connect(pg_db, autocommit=True) as conn:
                for i in range(1, 201):
                    started = time.perf_counter()
                    conn.execute("INSERT INTO items (id, v) VALUES (%s, %s)", (i, i))
                    latencies.append(time.perf_counter() - started)
                    committed.append((i, i))
                    time.sleep(0.005)
        finally:
            sampling.set()
            sampler.join()
        early.commit()
        wait_drained(pg_db)
    lat = sorted(latencies)
    print(f"commit latency with an early commit number open: p50 "
          f"{statistics.median(lat) * 1000:.1f} ms, p90 {lat[int(len(lat) * 0.9)] * 1000:.1f} ms",
          flush=True)
    assert len(waits) > 10 and max(waits) == 0, f"commit-lock requests waited: {max(waits)}"
    got = topic_facts(stack, f"{topic_prefix}.public.items", len(committed))
    verdict = compare("early commit number", committed, got)
    assert verdict.lost == 0 and verdict.dup == 0
    assert got[1] == (1000, 1), "the early transaction's number is lower: it goes first"
