"""A sink route's consumer never creates topics (``allow.auto.create.topics`` stays false, the
stack runs with broker auto-create off). Started before the relay made its topic, the worker
says so in one line and delivers the topic's events once it exists; its dead-letter topic is
created by dx with ``kafka.new_topics`` before the first dead letter."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from pipeline.config.loader import load_config
from pipeline.sink.worker import SinkWorker
from tests.integration.relay_support import dx
from tests.integration.test_sink_support import (
    EventProducer,
    Resp,
    read_topic,
    target,
    wait_for,
    write_config,
)


def test_sink_started_before_its_topic_waits_with_one_line_then_delivers(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    topic = f"{topic_prefix}.public.products"
    caplog.set_level(logging.WARNING, logger="pipeline.sink.worker")
    with target(lambda r, n: Resp(422) if "poison" in r.body.decode() else Resp(200)) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, f"""
  - name: early
    topics: [{topic}]
    retry: {{max_attempts: 1}}
    connector: {{type: http, url: "{srv.url}/items/{{$key.id}}"}}
""")
        head = f"kafka:\n  bootstrap_servers: {stack.kafka_bootstrap}\n"
        cfg.write_text(cfg.read_text().replace(head, head + "  new_topics:\n    partitions: 2\n"))
        assert dx("init", "-c", str(cfg)).returncode == 0
        worker = SinkWorker(load_config(cfg), "early", redrive_poll_s=0.2)
        errors: list[BaseException] = []
        thread = threading.Thread(target=lambda: _run(worker, errors), daemon=True)
        thread.start()
        try:
            waiting = wait_for(lambda: [r.getMessage() for r in caplog.records
                                        if "not there yet" in r.getMessage()] or errors, 60,
                               what="the worker's line about the missing topic")
            assert waiting == [f"route early: topics not there yet (waiting for them): {topic}"]
            admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
            assert topic not in admin.list_topics(timeout=10).topics  # nobody auto-created it
            prod = EventProducer(stack, topic, topic_prefix)  # the relay's part: creates it
            prod.send(1)
            prod.send(2, name="poison")
            prod.flush()
            wait_for(lambda: len(srv.received()) >= 2, 90, what="both events at the target")
            (letter,) = read_topic(stack, f"{topic}.dlq", 1)
        finally:
            worker.stop.set()
            thread.join(60)
    assert not errors, errors
    assert letter.value() == prod.value.encode(prod.sent[1])
    dlq = admin.list_topics(timeout=10).topics[f"{topic}.dlq"]
    assert len(dlq.partitions) == 2  # made by dx with kafka.new_topics


def _run(worker: SinkWorker, errors: list[BaseException]) -> None:
    try:
        worker.run()
    except BaseException as err:
        errors.append(err)
