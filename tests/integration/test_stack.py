"""The real stack does what dx relies on: Confluent wire format through the registry, PostgreSQL
transactions, and Kafka transactions with read_committed consumers."""

from __future__ import annotations

import json
import struct
import time
import uuid
from typing import Any

import psycopg
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from tests.conftest import Stack
from tests.kafka_support import create_topic

ORDER_SCHEMA = {
    "type": "record",
    "name": "Order",
    "namespace": "dx.test",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "sku", "type": "string"},
        {"name": "qty", "type": "int"},
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
}


def read_all(
    bootstrap: str, topic: str, *, isolation: str = "read_committed", timeout: float = 30
) -> list[Message]:
    """Every record of partition 0 from the beginning up to the (stable) end."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}-reader-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": isolation,
        }
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    records: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    return records
                if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    continue  # creation still propagating
                raise AssertionError(f"consumer error: {err}")
            records.append(msg)
        raise AssertionError(f"no end of {topic} within {timeout}s; read {len(records)} records")
    finally:
        consumer.close()


def produce(bootstrap: str, topic: str, value: bytes, key: bytes | None = None) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    errors: list[Any] = []
    producer.produce(topic, value=value, key=key, on_delivery=lambda e, _m: e and errors.append(e))
    assert producer.flush(30) == 0, "produce did not complete"
    assert not errors, errors


def test_avro_wire_format_through_registry(stack: Stack, topic_prefix: str) -> None:
    topic = f"{topic_prefix}.orders"
    create_topic(stack, topic)  # the stack never auto-creates topics
    subject = f"{topic}-value"
    registry = SchemaRegistryClient({"url": stack.schema_registry_url})
    serializer = AvroSerializer(registry, json.dumps(ORDER_SCHEMA))  # registers on first use
    ctx = SerializationContext(topic, MessageField.VALUE)
    record = {"id": 42, "sku": "SKU-ü-1", "qty": 3, "note": None}

    produce(stack.kafka_bootstrap, topic, serializer(record, ctx), key=b"42")
    (msg,) = read_all(stack.kafka_bootstrap, topic)
    raw = msg.value()
    assert raw is not None

    magic, schema_id = struct.unpack(">bI", raw[:5])
    assert magic == 0
    latest = registry.get_latest_version(subject)
    assert latest.schema_id == schema_id
    looked_up = registry.lookup_schema(subject, Schema(json.dumps(ORDER_SCHEMA), "AVRO"))
    assert looked_up.schema_id == schema_id
    fetched = registry.get_schema(schema_id)
    assert json.loads(fetched.schema_str) == ORDER_SCHEMA

    # A deserializer with a cold cache resolves the id from the registry alone.
    fresh = SchemaRegistryClient({"url": stack.schema_registry_url})
    assert AvroDeserializer(fresh)(raw, ctx) == record


def test_postgres_commit_is_visible_and_rollback_is_not(pg_db: str) -> None:
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)")
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)

    with psycopg.connect(pg_db) as conn:
        with conn.transaction():
            conn.execute("INSERT INTO items VALUES (1, 'kept')")
        try:
            with conn.transaction():
                conn.execute("INSERT INTO items VALUES (2, 'discarded')")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        conn.commit()

    with psycopg.connect(pg_db) as other:
        rows = other.execute("SELECT id, name FROM items ORDER BY id").fetchall()
    assert rows == [(1, "kept")]


def test_kafka_aborted_transactions_are_invisible_to_read_committed(
    stack: Stack, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}.tx"
    create_topic(stack, topic)
    producer = Producer(
        {
            "bootstrap.servers": stack.kafka_bootstrap,
            "transactional.id": f"{topic_prefix}-tx",
            "transaction.timeout.ms": 60000,
        }
    )
    producer.init_transactions(60)

    producer.begin_transaction()
    producer.produce(topic, value=b"aborted-1")
    producer.produce(topic, value=b"aborted-2")
    assert producer.flush(30) == 0
    producer.abort_transaction(30)

    producer.begin_transaction()
    producer.produce(topic, value=b"committed-1")
    producer.produce(topic, value=b"committed-2")
    producer.commit_transaction(30)

    committed = [m.value() for m in read_all(stack.kafka_bootstrap, topic)]
    assert committed == [b"committed-1", b"committed-2"]

    everything = [
        m.value() for m in read_all(stack.kafka_bootstrap, topic, isolation="read_uncommitted")
    ]
    assert everything == [b"aborted-1", b"aborted-2", b"committed-1", b"committed-2"]


def test_kafka_never_auto_creates_a_topic(stack: Stack, topic_prefix: str) -> None:
    """The stack runs like a production cluster (auto.create.topics.enable=false), so a dx
    writer that forgot to create its topic fails here too instead of passing by luck."""
    topic = f"{topic_prefix}.nobody-made-me"
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap, "message.timeout.ms": 3000})
    errors: list[Any] = []
    producer.produce(topic, value=b"x", on_delivery=lambda e, _m: errors.append(e))
    producer.flush(15)
    assert errors and errors[0] is not None, "a produce to a missing topic was acknowledged"
    assert topic not in producer.list_topics(timeout=10).topics
