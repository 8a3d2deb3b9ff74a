"""SIGTERM to ``dx relay`` while transactions keep committing: it exits cleanly within the grace
period, and after a restart every committed row is on its topic exactly once (exactly-once mode:
the cursor is committed in the same Kafka transaction as the records; logical capture: the slot is
confirmed only up to what Kafka committed). Runs in both capture modes."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration.relay_support import (
    TopicReader,
    captured_items,
    relay_thread,
    start_relay_process,
)
from tests.integration.test_sink_support import wait_for

pytestmark = pytest.mark.integration

GRACE_S = 20
TRANSACTIONS, ROWS = 40, 100


def test_sigterm_under_load_exits_in_time_and_every_commit_arrives_once(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path, capture_mode: str) -> None:
    cfg = captured_items(stack, pg_db, topic_prefix, tmp_path, capture_mode=capture_mode)
    committed = {"n": 0}
    errors: list[BaseException] = []
    stop_sent = threading.Event()

    def writer() -> None:  # keeps committing before, during and after the stop
        try:
            with psycopg.connect(pg_db, autocommit=True) as conn:
                for t in range(TRANSACTIONS):
                    if t == TRANSACTIONS // 2:  # the rest commits while the relay stops
                        stop_sent.wait(120)
                    conn.execute("INSERT INTO items (id) "
                                 "SELECT g FROM generate_series(%s::int, %s::int) g",
                                 (t * ROWS, t * ROWS + ROWS - 1))
                    committed["n"] += ROWS
                    time.sleep(0.05)
        except BaseException as err:  # surfaced below
            errors.append(err)

    # what reached Kafka, read back with a consumer that is not dx code (the same measure in
    # both modes: logical capture leaves no outbox to count)
    reader = TopicReader(stack, f"{topic_prefix}.public.items")

    def relayed() -> int:
        return len(reader.read(until=TRANSACTIONS * ROWS, timeout_s=0.5))

    load = threading.Thread(target=writer)
    proc = start_relay_process(cfg)
    load.start()
    try:
        wait_for(lambda: relayed() >= ROWS or proc.poll() is not None or errors, 60,
                 what="the relay to publish under load")
        assert not errors, errors
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        proc.send_signal(signal.SIGTERM)
        committed_at_stop = committed["n"]
        stop_sent.set()
        out, _ = proc.communicate(timeout=GRACE_S)
        assert proc.returncode == 0, out
        assert "stopped" in out
    finally:
        stop_sent.set()
        load.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not errors, errors
    assert committed_at_stop < TRANSACTIONS * ROWS  # stopped while the writes went on

    with relay_thread(cfg):
        events = reader.read(until=TRANSACTIONS * ROWS, settle_s=1.0)
    reader.close()
    seen = Counter(e.key["id"] for e in events if e.key)
    assert set(seen) == set(range(TRANSACTIONS * ROWS))  # nothing lost
    assert [k for k, n in seen.items() if n > 1] == []    # nothing twice
