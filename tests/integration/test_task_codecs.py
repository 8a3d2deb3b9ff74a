"""Issue 14's two drifted bugs, on both sides: a binary and a null Kafka header survive a redrive
(sink and source tasks share one header codec), and ``dx tasks list --key`` finds sink tasks
(``{"id":42}``) and source tasks (``[42]``) alike, whichever form is typed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer

from pipeline.tasks.store import TaskFilter, TaskRow, TaskStore, ensure_schema
from tests.integration.test_sink_support import (
    EventProducer,
    Resp,
    create_topic,
    read_topic,
    sink_thread,
    target,
    tasks,
    wait_for,
    write_config,
)
from tests.integration.test_source_apply import route_yaml as source_route
from tests.integration.test_source_apply import setup_db
from tests.integration.test_source_support import read_raw, run_worker
from tests.integration.test_source_support import write_config as source_config

pytestmark = pytest.mark.integration

ODD = [("bin", b"\xff\x00\x01"), ("none", None), ("text", b"ok")]


def odd_headers(msg: Any) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in (msg.headers() or []) if k in ("bin", "none", "text")]


def test_binary_and_null_headers_survive_a_sink_redrive(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)
    with target(lambda r, n: Resp(400, '{"error": "no"}')) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, f"""
  - name: hdr
    topics: [{topic}]
    connector: {{type: http, url: "{srv.url}/items/{{$key.id}}"}}
""")
        prod = EventProducer(stack, topic, topic_prefix)
        env = prod.envelope(1)
        prod.producer.produce(topic, key=prod.key.encode({"id": 1}), value=prod.value.encode(env),
                              headers=ODD)
        prod.flush()
        with sink_thread(cfg, "hdr"):
            wait_for(lambda: [r["status"] for r in tasks(pg_db, "hdr")] == ["dead"], 30,
                     what="the dead task")
            with psycopg.connect(pg_db) as conn:
                assert TaskStore(conn).retry(TaskFilter(route="hdr"))
            wait_for(lambda: [r["dlq"] and r["attempts"] for r in tasks(pg_db, "hdr")] == [2],
                     30, what="the redriven task to go dead again")
    first, again = read_topic(stack, f"{topic}.dlq", 2)
    assert odd_headers(first) == ODD
    assert odd_headers(again) == ODD


def test_binary_and_null_headers_survive_a_source_redrive(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    setup_db(pg_db)
    topic = f"{topic_prefix}.erp.items"
    create_topic(stack, topic)
    cfg = source_config(tmp_path / "dx.yaml", stack, pg_db, source_route("in", topic))
    p = Producer({"bootstrap.servers": stack.kafka_bootstrap})
    p.produce(topic, key=json.dumps({"id": 1}).encode(),
              value=json.dumps({"id": 1, "title": "x", "cat": 99}).encode(), headers=ODD)
    assert p.flush(30) == 0
    run_worker(cfg, "in")
    with psycopg.connect(pg_db) as conn:
        assert TaskStore(conn).retry(TaskFilter(route="in"))
    run_worker(cfg, "in")
    first, again = read_raw(stack, f"{topic}.dlq", 2)
    assert odd_headers(first) == ODD
    assert odd_headers(again) == ODD


def test_key_filter_finds_sink_and_source_tasks_alike(pg_db: str) -> None:
    with psycopg.connect(pg_db) as conn:
        ensure_schema(conn)
        store = TaskStore(conn)
        rows = [TaskRow("sink", "t", 0, 1, "dead", key='{"id":42}'),
                TaskRow("source", "t", 0, 2, "dead", key="[42]"),
                TaskRow("sink", "t", 0, 3, "dead", key='{"id":43}'),
                TaskRow("sink", "t", 0, 4, "dead", key='{"region":"EU","sku":"a-1"}'),
                TaskRow("source", "t", 0, 5, "dead", key='["EU","a-1"]'),
                TaskRow("source", "t", 0, 6, "dead", key="not json")]
        with conn.cursor() as cur:
            from pipeline.tasks.store import UPSERT
            cur.executemany(UPSERT, [r.params() for r in rows])
        conn.commit()

        def found(key: str) -> list[int]:
            return [int(r["offset"]) for r in store.find(TaskFilter(key=key))]

        for typed in ("42", "[42]", '{"id":42}', '{"id": 42}'):
            assert found(typed) == [1, 2], typed
        for typed in ('["EU","a-1"]', '{"sku":"a-1","region":"EU"}', '{"region":"EU","sku":"a-1"}'):
            assert found(typed) == [4, 5], typed
        assert found("not json") == [6]
