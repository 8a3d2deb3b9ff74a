"""Topics a source route needs are created by dx, never left to broker auto-create (which
production clusters turn off): the inbound and dead-letter topics exist, with the configured
settings, before the first dead letter; a cluster that refuses to create them gives one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka.admin import AdminClient, ConfigResource

from pipeline.config.loader import load_config
from pipeline.inbound.produce import InboundProducer, read_route_target
from tests.integration.test_source_support import produce, read_raw, run_worker, write_config

ROUTE = """  - name: stock
    topic: {topic}
    format: json
    table: stock
"""


def kafka_block(stack: Any, new_topics: str) -> str:
    """A kafka: section whose consumers never ask the broker to auto-create a topic."""
    return f"""
kafka:
  bootstrap_servers: {stack.kafka_bootstrap}
  client:
    allow.auto.create.topics: false
  new_topics:
{new_topics}"""


def config(tmp_path: Path, stack: Any, pg_db: str, topic: str, new_topics: str) -> Path:
    path = write_config(tmp_path / "dx.yaml", stack, pg_db, ROUTE.format(topic=topic))
    text = path.read_text().replace(f"kafka:\n  bootstrap_servers: {stack.kafka_bootstrap}\n",
                                    kafka_block(stack, new_topics))
    path.write_text(text)
    return path


def test_inbound_and_dead_letter_topics_are_created_before_they_are_needed(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    with psycopg.connect(pg_db) as conn:
        conn.execute("CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL)")
    topic = f"{topic_prefix}.stock"
    cfg = config(tmp_path, stack, pg_db, topic,
                 "    config:\n      retention.ms: 1234567\n")
    # Nobody created the topics; the worker finds nothing to apply and stops when idle.
    assert run_worker(cfg, "stock").applied == 0
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    topics = admin.list_topics(timeout=10).topics
    assert topic in topics and f"{topic}.dlq" in topics  # both exist before any dead letter
    res = ConfigResource(ConfigResource.Type.TOPIC, f"{topic}.dlq")
    described = next(iter(admin.describe_configs([res]).values())).result(30)
    assert described["retention.ms"].value == "1234567"  # dx made it, with kafka.new_topics
    produce(stack, topic, [({"sku": "a"}, {"sku": "a", "qty": 1}),
                           ({"sku": "b"}, {"sku": "b", "qty": "many"})])  # b: a poison message
    stats = run_worker(cfg, "stock")
    assert (stats.applied, stats.failed) == (1, 1)
    assert [m.offset() for m in read_raw(stack, f"{topic}.dlq", 1)] == [0]


def test_a_topic_the_cluster_refuses_to_create_is_one_line(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    with psycopg.connect(pg_db) as conn:
        conn.execute("CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL)")
    topic = f"{topic_prefix}.stock"
    cfg = config(tmp_path, stack, pg_db, topic, "    replication_factor: 3\n")  # one broker
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "source", "run", "stock",
                          "-c", str(cfg), "--stop-when-idle", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"dx: error: cannot create Kafka topic '{topic}' (inbound topic "
                               "of source route stock): invalid replication factor: "), lines
    assert "create it yourself (partitions 1, replication factor 3)" in lines[0]


def test_inbound_producers_create_the_route_topics_before_the_first_message(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    """Webhooks, pulls and file drops write through one InboundProducer: it creates the route's
    inbound and dead-letter topics (kafka.new_topics) before its first message, instead of a
    produce that waits for a topic the broker will never auto-create."""
    with psycopg.connect(pg_db) as conn:
        conn.execute("CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL)")
    topic = f"{topic_prefix}.stock"
    cfg = load_config(config(tmp_path, stack, pg_db, topic, "    partitions: 2\n"))
    _, route, target = read_route_target(cfg, "stock")
    producer = InboundProducer(cfg, route, target, ack_timeout_s=30)
    try:
        message = producer.message({"sku": "a", "qty": 1}, {"kind": "test"})
        assert producer.send([message]) == 1
    finally:
        producer.close()
    topics = AdminClient({"bootstrap.servers": stack.kafka_bootstrap}).list_topics(
        timeout=10).topics
    assert len(topics[topic].partitions) == 2 and f"{topic}.dlq" in topics
    assert [m.value() for m in read_raw(stack, topic, 1)] == [message.value]
