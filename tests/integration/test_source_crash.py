"""Exactly-once through crashes, rebalances and SIGTERM: two source worker processes share a
3-partition route while a stream is produced; either is ``kill -9``-ed at random points and
restarted (or one worker is stopped with SIGTERM mid-stream and must exit within the grace period).
Afterwards every event is applied exactly once: the route runs in ``insert`` mode, so an event
applied twice would surface as a dead "already exists" task, one skipped as a missing row, and
the table's checksum must equal the one computed from the events."""

from __future__ import annotations

import hashlib
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration.test_sink_support import wait_for
from tests.integration.test_source_support import (
    create_topic,
    produce,
    tasks,
    worker_process,
    write_config,
)

pytestmark = pytest.mark.integration

N = 24_000
GRACE_S = 20  # a SIGTERM-ed worker must be gone well within the pod's grace period


def ledger_route(tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str) -> tuple[Path, str]:
    """A 3-partition JSON route in ``insert`` mode into ``ledger``; ``applied`` logs every write
    (an event applied twice shows up there even if the row looks right)."""
    with psycopg.connect(pg_db) as conn:
        conn.execute("""
            CREATE TABLE ledger (id bigint PRIMARY KEY, payload text NOT NULL, amount int);
            CREATE TABLE applied (id bigint, at timestamptz DEFAULT clock_timestamp());
            CREATE FUNCTION log_applied() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO applied (id) VALUES (NEW.id); RETURN NEW; END $$;
            CREATE TRIGGER log_applied AFTER INSERT OR UPDATE ON ledger
                FOR EACH ROW EXECUTE FUNCTION log_applied();
        """)
    topic = f"{topic_prefix}.ledger"
    create_topic(stack, topic, partitions=3)
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, f"""  - name: ledger
    topic: {topic}
    format: json
    table: ledger
    mode: insert
    batch_size: 150
    batch_timeout_ms: 50
""")
    text = cfg.read_text().replace(
        "kafka:\n", "kafka:\n  client: {session.timeout.ms: 6000, heartbeat.interval.ms: 500}\n")
    cfg.write_text(text)
    return cfg, topic


def ledger_events(n: int) -> list[tuple[dict[str, int], dict[str, Any]]]:
    return [({"id": i}, {"id": i, "payload": f"p{i:06d}", "amount": (i * 7919) % 1000})
            for i in range(n)]


def stream(stack: Any, topic: str, events: list[Any]) -> threading.Thread:
    """Produce ``events`` in chunks, live, while the workers apply them."""

    def run() -> None:
        for start in range(0, len(events), 2000):
            produce(stack, topic, events[start:start + 2000])
            time.sleep(0.3)

    producer = threading.Thread(target=run)
    producer.start()
    return producer


def ledger_rows(pg_db: str) -> int:
    with psycopg.connect(pg_db) as conn:
        return int(conn.execute("SELECT count(*) FROM ledger").fetchone()[0])  # type: ignore[index]


def assert_applied_exactly_once(pg_db: str, events: list[Any]) -> None:
    n = len(events)
    with psycopg.connect(pg_db) as conn:
        count, distinct_ids, checksum = conn.execute(
            "SELECT count(*), count(DISTINCT id), "
            "md5(string_agg(id || ':' || payload || ':' || amount, ',' ORDER BY id)) "
            "FROM ledger").fetchone()
        applied_once = conn.execute(
            "SELECT count(*) = count(DISTINCT id) FROM applied").fetchone()[0]
        stored = conn.execute("SELECT sum(next_offset) FROM dx.source_offsets "
                              "WHERE route = 'ledger'").fetchone()[0]
    expected = hashlib.md5(",".join(
        f"{v['id']}:{v['payload']}:{v['amount']}" for _, v in events).encode()).hexdigest()
    assert tasks(pg_db, "ledger") == []  # an event applied twice would be a dead task here
    assert (count, distinct_ids) == (n, n)
    assert applied_once
    assert checksum == expected
    assert stored == n


def test_kill_9_at_random_points_applies_every_event_exactly_once(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str) -> None:
    cfg, topic = ledger_route(tmp_path, stack, pg_db, topic_prefix)
    events = ledger_events(N)
    producer = stream(stack, topic, events)
    rng = random.Random(5)
    procs = [worker_process(cfg, "ledger"), worker_process(cfg, "ledger")]
    kills = 0
    try:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.8, 3.0))
            victim = rng.randrange(len(procs))
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait()
            kills += 1
            procs[victim] = worker_process(cfg, "ledger")
    finally:
        producer.join()
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
    assert kills >= 5
    before_drain = ledger_rows(pg_db)
    print(f"kills={kills} applied by the killed workers={before_drain}")
    assert before_drain > 0, "the workers never got to apply before being killed"

    # drain what the killed workers left; wait for the count, not for idleness: the group first
    # waits out the killed members' sessions, which looks idle but is not done
    proc = worker_process(cfg, "ledger")
    try:
        wait_for(lambda: ledger_rows(pg_db) >= len(events) or proc.poll() is not None, 120,
                 what="a fresh worker to apply the rest")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=GRACE_S)
    assert proc.returncode == 0, err
    assert_applied_exactly_once(pg_db, events)


def test_sigterm_under_load_exits_in_time_and_nothing_is_lost_or_doubled(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str) -> None:
    cfg, topic = ledger_route(tmp_path, stack, pg_db, topic_prefix)
    events = ledger_events(12_000)
    producer = stream(stack, topic, events)
    proc = worker_process(cfg, "ledger")
    try:
        wait_for(lambda: ledger_rows(pg_db) > 0 or proc.poll() is not None, 60,
                 what="the worker to apply under load")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=GRACE_S)
        assert proc.returncode == 0, err
        at_stop = ledger_rows(pg_db)
    finally:
        producer.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert 0 < at_stop < len(events)  # stopped mid-stream

    proc = worker_process(cfg, "ledger")  # a new worker resumes from dx.source_offsets
    try:
        wait_for(lambda: ledger_rows(pg_db) >= len(events) or proc.poll() is not None, 60,
                 what="the restarted worker to apply the rest")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=GRACE_S)
    assert proc.returncode == 0, err
    assert_applied_exactly_once(pg_db, events)
