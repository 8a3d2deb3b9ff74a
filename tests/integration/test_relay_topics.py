"""The relay creates every topic it writes before the first write, with ``kafka.new_topics``
(the stack runs with broker auto-create off, as production does): entity topics, topics an
application's outbox events are routed to, and (exactly-once) its compacted state topic of one
partition, whatever ``new_topics`` says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient, ConfigResource

from pipeline.config.loader import load_config
from tests.integration.relay_support import captured_items, execute, relay_thread
from tests.integration.test_sink_support import wait_for


def test_relay_creates_entity_outbox_and_state_topics_with_new_topics(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    cfg = captured_items(stack, pg_db, topic_prefix, tmp_path)
    head = f"kafka:\n  bootstrap_servers: {stack.kafka_bootstrap}\n"
    cfg.write_text(cfg.read_text().replace(head, head + (
        "  new_topics:\n    partitions: 3\n    config:\n      retention.ms: 7654321\n")))
    execute(pg_db, "INSERT INTO items (id, v) VALUES (1, 1)",
            "SELECT dx.publish('order', '1', 'OrderPlaced', '{}')")
    with relay_thread(cfg) as relay:
        wait_for(lambda: relay.stats.events >= 2, 90, what="both events published")
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    topics = admin.list_topics(timeout=10).topics
    state = load_config(cfg).state_topic
    for topic in (f"{topic_prefix}.public.items", f"{topic_prefix}.outbox.order"):
        assert len(topics[topic].partitions) == 3, topic
        assert _setting(admin, topic, "retention.ms") == "7654321"
    assert len(topics[state].partitions) == 1
    assert _setting(admin, state, "cleanup.policy") == "compact"


def _setting(admin: AdminClient, topic: str, name: str) -> str:
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    return str(next(iter(admin.describe_configs([res]).values())).result(30)[name].value)
