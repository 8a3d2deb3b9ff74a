"""Kafka plumbing for the relay: producer settings, the cursor state topic (topics are created
by :func:`pipeline.events.topics.ensure_topics`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from pipeline.config import DxConfig
from pipeline.errors import ServiceUnavailable
from pipeline.observability.kafka_outage import outage_reporter
from pipeline.observability.logging import KAFKA_LOG
from pipeline.relay.reader import Cursor


def producer_config(config: DxConfig) -> dict[str, Any]:
    conf = config.kafka.librdkafka({
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        # Java clients' default partitioner, so keys land where Kafka Connect/Streams expect.
        "partitioner": "murmur2_random",
        "message.timeout.ms": 60_000,
        # the relay learns of failures from the one callback; successes need no Python call
        "delivery.report.only.error": True,
        "error_cb": outage_reporter(config.kafka.bootstrap_servers),
    })
    if config.relay.mode == "exactly-once":
        conf["transactional.id"] = f"dx-relay-{config.relay.name}"
        # librdkafka requires message.timeout.ms <= transaction.timeout.ms; a dead relay's open
        # transaction is aborted at once anyway when the next one calls init_transactions.
        conf["transaction.timeout.ms"] = 60_000
    else:
        # at-least-once keeps per-key order for consumers that de-duplicate by event_id: a
        # record never times out in the queue (a timed-out record is a gap that newer records
        # would close behind, and the retried batch would repeat it after them), and an error
        # that would leave a gap stops the producer at it (fatal); the relay's retry budget
        # bounds the wait instead, and a new producer sends the whole batch again in order
        conf["message.timeout.ms"] = 0
        conf["enable.gapless.guarantee"] = True
    return conf


def check_reachable(config: DxConfig, timeout_s: float = 10.0) -> AdminClient:
    admin = AdminClient(config.kafka.librdkafka(), logger=KAFKA_LOG)
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException as err:
        raise ServiceUnavailable("kafka", config.kafka.bootstrap_servers,
                                 f"no broker answered within {timeout_s:.0f}s ({err.args[0]})"
                                 ) from None
    return admin


def make_producer(config: DxConfig) -> Producer:
    return Producer(producer_config(config), logger=KAFKA_LOG)


@dataclass(frozen=True)
class RelayState:
    """The last position committed to the state topic. Trigger mode: (commit sequence, outbox
    id); logical mode: (final LSN, ordinal) with ``mode`` ``logical`` and the slot's epoch."""

    cursor: Cursor = field(default_factory=Cursor)
    system: int | None = None
    mode: str = "trigger"
    epoch: str | None = None


def read_state(config: DxConfig, timeout_s: float = 30.0) -> RelayState:
    """The last state committed to the state topic (read_committed, so aborted writes are
    unseen; the last record wins, never the largest: after a deliberate reset the cursor goes
    down)."""
    conf = config.kafka.librdkafka({"group.id": f"dx-relay-state-{config.relay.name}",
                                    "isolation.level": "read_committed",
                                    "enable.auto.commit": False, "enable.partition.eof": True})
    consumer = Consumer(conf, logger=KAFKA_LOG)
    key = config.relay.name.encode()
    last: tuple[int, RelayState] | None = None
    try:
        md = consumer.list_topics(config.state_topic, timeout=timeout_s)
        partitions = md.topics[config.state_topic].partitions
        consumer.assign([TopicPartition(config.state_topic, p, 0) for p in partitions])
        remaining = set(partitions)
        while remaining:
            msg = consumer.poll(timeout_s)
            if msg is None:
                raise ServiceUnavailable("kafka", config.state_topic,
                                         "timed out reading the relay state topic")
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    remaining.discard(msg.partition())
                    continue
                raise ServiceUnavailable("kafka", config.state_topic, str(error))
            value = msg.value()
            if msg.key() == key and value:
                data = json.loads(value)
                system = data.get("system")
                offset = msg.offset() or 0
                if last is None or offset > last[0]:
                    last = (offset, RelayState(
                        Cursor(int(data["seq"]), int(data["id"])),
                        int(system) if system is not None else None,
                        str(data.get("mode", "trigger")), data.get("epoch")))
    finally:
        consumer.close()
    return last[1] if last else RelayState()


def state_record(config: DxConfig, cursor: Cursor, system_id: int,
                 epoch: str | None = None) -> tuple[str, bytes, bytes]:
    """The state topic record for ``cursor``; ``epoch`` marks a logical-mode position."""
    data: dict[str, Any] = {"seq": cursor.seq, "id": cursor.id, "system": system_id}
    if epoch is not None:
        data.update(mode="logical", epoch=epoch)
    return (config.state_topic, config.relay.name.encode(), json.dumps(data).encode())
