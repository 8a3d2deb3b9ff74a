"""The one way a test makes a Kafka topic before it produces to it.

The test stacks run with broker auto-create off, like production: a test producer writing to a
topic nobody created waits for metadata until its message timeout. Tests that play a producing
system (inbound events, change events written the relay's way) call :func:`create_topic` first;
the test producers of the support modules do it themselves. It goes through dx's own
:func:`~pipeline.events.topics.ensure_topics`.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka.admin import AdminClient

from pipeline.events.topics import TopicSpec, ensure_topics


def create_topic(stack: Any, topic: str, partitions: int | None = None) -> None:
    """Create ``topic`` (replication factor 1) unless it exists; return once it is visible.

    ``partitions``: the count the test needs (an existing topic with another count fails the
    test); None: 1 for a new topic, whatever an existing one has."""
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    ensure_topics(admin, [TopicSpec(topic, "test topic", partitions or 1, 1)])
    if partitions is not None:
        have = len(admin.list_topics(topic, timeout=10).topics[topic].partitions)
        assert have == partitions, f"topic {topic} exists with {have} partitions, not {partitions}"
