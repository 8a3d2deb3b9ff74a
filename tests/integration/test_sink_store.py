"""The sink's task store under hostile content: a NUL character (which PostgreSQL text and jsonb
cannot hold) in an error, a log or a header is removed instead of failing the batch, and a write
the database rejects for any other reason stops the worker with one clear error instead of
silently stalling its route."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_sink_support import (
    EventProducer,
    Req,
    Resp,
    create_topic,
    sink_thread,
    target,
    tasks,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration


def test_a_nul_in_the_target_answer_is_recorded_without_it_and_the_route_keeps_flowing(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)

    def script(r: Req, n: int) -> Resp:
        if (r.json or {}).get("behaviour") == "400":
            return Resp(400, '{"error": "bad\x00sku"}')
        return Resp(200)

    with target(script) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, f"""
  - name: nul
    topics: [{topic}]
    concurrency: 1
    retry: {{max_attempts: 2, backoff_base_s: 0.05, backoff_max_s: 0.1}}
    log: {{detail: full}}
    connector: {{type: http, url: "{srv.url}/items/{{$key.id}}", method: PUT}}
""")
        prod = EventProducer(stack, topic, topic_prefix)
        prod.send(1, seq=1, behaviour="400")
        prod.send(1, seq=2)
        for k in range(2, 6):
            prod.send(k, seq=1)
        prod.flush()
        prod.producer.produce(topic, key=prod.key.encode({"id": 7}), value=b"\x00poison",
                              headers=[("x-bin", b"a\x00b\xff")])
        prod.flush()
        with sink_thread(cfg, "nul") as worker:
            rows = wait_for(lambda: (r := tasks(pg_db, "nul")) and len(r) == 7
                            and all(x["status"] != "retrying" for x in r) and r, 60,
                            what="every event recorded")
            st = {(r["key"], r["offset"]): r["status"] for r in rows}
            dead = [r for r in rows if r["status"] == "dead"]
            assert len(dead) == 2, st
            first = min(dead, key=lambda r: r["offset"])
            assert st[('{"id":1}', 1)] == "pending"  # parked behind it
            assert "bad" in first["error"] and "sku" in first["error"]
            assert "\x00" not in first["error"]
            assert "\x00" not in str(first["export_log"])
            # the poison message keeps its headers, binary and NUL included, for a retry
            poison = max(dead, key=lambda r: r["offset"])
            assert bytes(poison["raw_value"]) == b"\x00poison"
            assert poison["raw_headers"] == [["x-bin", "YQBi/w==", "base64"]]
            assert [r["status"] for r in rows if r["status"] == "succeeded"] == ["succeeded"] * 4
            # the route keeps flowing: later events are delivered, offsets committed
            prod.send(9, seq=1)
            prod.flush()
            wait_for(lambda: any(r["key"] == '{"id":9}' and r["status"] == "succeeded"
                                 for r in tasks(pg_db, "nul")), 30, what="a later event")
            wait_for(lambda: worker.tracker.committable() == [], 10, what="offsets committed")
            assert worker.writer.fatal is None


def test_a_write_the_database_rejects_stops_the_writer_loudly(pg_db: str) -> None:
    from pipeline.db import connect
    from pipeline.errors import TerminalError
    from pipeline.tasks.store import TaskRow, ensure_schema
    from pipeline.tasks.writer import TaskWriter

    with contextlib.closing(connect(pg_db, autocommit=True)) as conn:
        ensure_schema(conn)
    writer = TaskWriter(pg_db)
    writer.start()
    acked = threading.Event()
    try:
        writer.put(TaskRow(route="r", topic="t", partition=0, offset=1, status="bogus"),
                   acked.set)
        with pytest.raises(TerminalError, match="task store rejected a write"):
            writer.flush(10)
        assert writer.fatal is not None and not acked.is_set()
        assert not writer.thread.is_alive()
    finally:
        writer.close()


def test_a_redrive_outcome_does_not_overwrite_an_operator_skip(pg_db: str) -> None:
    from pipeline.db import connect
    from pipeline.tasks.store import TaskFilter, TaskRow, TaskStore, ensure_schema
    from pipeline.tasks.writer import TaskWriter

    with contextlib.closing(connect(pg_db, autocommit=True)) as conn:
        ensure_schema(conn)
    writer = TaskWriter(pg_db)
    writer.start()
    try:
        row = TaskRow(route="r", topic="t", partition=0, offset=1, status="pending", key="k",
                      raw_value=b"v", redrive=True)
        writer.put(row)
        writer.flush(10)
        # the redrive read the pending task; meanwhile the operator skips it
        with contextlib.closing(connect(pg_db)) as conn:
            (task_id,) = TaskStore(conn).skip(TaskFilter(route="r"))
        for status in ("retrying", "succeeded"):
            writer.put(TaskRow(route="r", topic="t", partition=0, offset=1, status=status,
                               key="k", attempts=1))
        writer.flush(10)
        with contextlib.closing(connect(pg_db)) as conn:
            task = TaskStore(conn).get(task_id)
        assert task is not None and task["status"] == "skipped"
        assert task["error"] == "skipped by operator"
    finally:
        writer.close()
