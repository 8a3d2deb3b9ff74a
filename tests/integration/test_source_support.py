"""Shared pieces of the source-worker integration tests (no tests here): a dx.yaml per test,
topics, a plain producer (third-party systems are not dx code), the worker in-process or as a
subprocess, and a raw reader for dead-letter topics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer

from pipeline.config.loader import load_config
from pipeline.source.worker import SourceWorker, Stats
from tests.kafka_support import create_topic as create_topic  # re-exported: the tests use it


def write_config(path: Path, stack: Any, db_url: str, sources: str, tables: str = "") -> Path:
    path.write_text(f"""
database:
  url: {db_url}
kafka:
  bootstrap_servers: {stack.kafka_bootstrap}
schema_registry:
  url: {stack.schema_registry_url}
{tables}
sources:
{sources}
""")
    return path


def encode(v: Any) -> bytes | None:
    if v is None or isinstance(v, bytes):
        return v
    return json.dumps(v).encode()


def produce(stack: Any, topic: str, messages: list[tuple[Any, Any]],
            partition: int | None = None) -> None:
    """(key, value) pairs as JSON (bytes as they are, None as null/tombstone), in order; the
    topic is created first when missing (the stack has auto-create off)."""
    create_topic(stack, topic)
    p = Producer({"bootstrap.servers": stack.kafka_bootstrap, "enable.idempotence": True,
                  "linger.ms": 20})
    for key, value in messages:
        kwargs: dict[str, Any] = {"key": encode(key), "value": encode(value)}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                p.produce(topic, **kwargs)
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    assert p.flush(60) == 0


def run_worker(config_path: Path, route: str, idle_s: float = 1.5) -> Stats:
    """The worker in this process until the topic has been quiet for ``idle_s``."""
    return SourceWorker(load_config(config_path), route, stop_when_idle_s=idle_s).run()


def worker_process(config_path: Path, route: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "source", "run", route, "-c", str(config_path),
         *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})


def read_raw(stack: Any, topic: str, n: int, timeout_s: float = 30) -> list[Any]:
    c = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": f"t-{time.time_ns()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < n and time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is None:
                continue
            if m.error():
                if m.error().code() in (KafkaError._PARTITION_EOF,
                                        KafkaError.UNKNOWN_TOPIC_OR_PART):
                    continue
                raise AssertionError(str(m.error()))
            out.append(m)
    finally:
        c.close()
    return out


def tasks(db_url: str, route: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(db_url) as conn:
        return conn.execute(
            'SELECT "offset", status, error FROM dx.task WHERE route = %s ORDER BY "offset"',
            (route,)).fetchall()


STOCK = "CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL)"


def stock_route(stack: Any, db_url: str, topic_prefix: str, tmp_path: Path, *,
                table: str = STOCK, extra: str = "", create: bool = True) -> tuple[str, Path]:
    """Table ``stock`` and a json route 'stock' into it (``extra``: more route keys); returns
    the route's topic (created unless ``create`` is false) and the dx.yaml path."""
    import psycopg

    with psycopg.connect(db_url) as conn:
        conn.execute(table)  # type: ignore[arg-type]
    topic = f"{topic_prefix}.stock"
    if create:
        create_topic(stack, topic)
    cfg = write_config(tmp_path / "dx.yaml", stack, db_url, f"""  - name: stock
    topic: {topic}
    format: json
    table: stock
{extra}""")
    return topic, cfg
