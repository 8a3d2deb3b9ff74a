"""How dx shapes the topics it creates: kafka.new_topics defaults, fixed shapes on top."""

from __future__ import annotations

from pipeline.config.loader import parse_config
from pipeline.events.topics import TopicSpec, topic_spec

BASE = """\
database: {url: "postgresql://u@h/db"}
kafka:
  bootstrap_servers: localhost:9092
  new_topics: {partitions: 6, replication_factor: 3, config: {min.insync.replicas: 2}}
schema_registry: {url: "http://localhost:8081"}
"""


def test_topic_spec_uses_the_configured_defaults_and_fixed_shapes_win() -> None:
    kafka = parse_config(BASE, env={}).kafka
    assert topic_spec(kafka, "t.dlq", "dead letters") == TopicSpec(
        "t.dlq", "dead letters", 6, 3, {"min.insync.replicas": "2"})
    state = topic_spec(kafka, "state", "relay state", partitions=1,
                       config={"cleanup.policy": "compact"})
    assert (state.partitions, dict(state.config)) == (
        1, {"min.insync.replicas": "2", "cleanup.policy": "compact"})
    default = parse_config(BASE.replace("  new_topics: {partitions: 6, replication_factor: 3, "
                                        "config: {min.insync.replicas: 2}}\n", ""), env={})
    assert topic_spec(default.kafka, "x", "y") == TopicSpec("x", "y", 1, -1, {})
