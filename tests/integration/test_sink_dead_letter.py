"""Dead-letter produce: a message too large for Kafka is dead-lettered as a truncated copy
(instead of crash-looping the worker), and a stop is not held up by the dead-letter retry loop."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_sink_support import (
    EventProducer,
    Req,
    Resp,
    create_topic,
    read_topic,
    sink_thread,
    target,
    tasks,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration


def route_yaml(url: str, topic: str) -> str:
    return f"""
  - name: dlq
    topics: [{topic}]
    concurrency: 1
    retry: {{max_attempts: 2, backoff_base_s: 0.05, backoff_max_s: 0.1}}
    connector: {{type: http, url: "{url}/items/{{$key.id}}", method: PUT}}
"""


def reject_400(r: Req, n: int) -> Resp:
    return Resp(400, '{"error": "no"}') if (r.json or {}).get("behaviour") == "400" else Resp()


def test_a_dead_letter_too_large_for_kafka_goes_as_a_truncated_copy(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)
    with target(reject_400) as srv:
        # the worker's producer takes at most 20 kB; the event is ~60 kB
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                           route_yaml(srv.url, topic), client={"message.max.bytes": 20000})
        prod = EventProducer(stack, topic, topic_prefix)
        prod.send(1, behaviour="400", name="x" * 60000)
        prod.send(2)
        prod.flush()
        with sink_thread(cfg, "dlq") as worker:
            rows = wait_for(lambda: (r := tasks(pg_db, "dlq")) and len(r) == 2
                            and {x["status"] for x in r} == {"dead", "succeeded"} and r, 60,
                            what="the dead task and the next event")
            dead = next(r for r in rows if r["status"] == "dead")
            assert dead["dlq"]["truncated"] is True
            assert len(bytes(dead["raw_value"])) > 60000  # the original stays in the task store
            (m,) = read_topic(stack, f"{topic}.dlq", 1)
            h = {k: v.decode() for k, v in m.headers()}
            assert h["dx.dlq.truncated"] == "true" and int(h["dx.dlq.original_bytes"]) > 60000
            assert h["dx.dlq.offset"] == str(dead["offset"]) and h["dx.dlq.route"] == "dlq"
            assert b"truncated" in m.value() and len(m.value()) < 200
            assert not worker.stop.is_set()


def test_stop_is_not_held_up_by_the_dead_letter_retry_loop(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)
    with target(reject_400) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                           route_yaml(srv.url, topic))
        prod = EventProducer(stack, topic, topic_prefix)
        prod.send(1, behaviour="400")
        prod.flush()
        with sink_thread(cfg, "dlq") as worker:
            # the dead-letter topic cannot be written: every produce fails
            letters = worker.dead_letters
            real = letters.send

            def failing(*a: Any, **kw: Any) -> Any:
                letters.producer = FailingProducer(letters.producer)  # type: ignore[assignment]
                return real(*a, **kw)

            letters.send = failing  # type: ignore[method-assign]
            wait_for(lambda: srv.received(), 30, what="the delivery attempt")
            time.sleep(0.5)
            started = time.monotonic()
            worker.stop.set()
        assert time.monotonic() - started < 10
        # not dead-lettered, so not dead: its offset stays uncommitted, Kafka redelivers it
        assert [r["status"] for r in tasks(pg_db, "dlq")] == ["failed"]


class FailingProducer:
    """A producer whose every produce fails (the broker refuses the dead-letter topic)."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def produce(self, *a: Any, **kw: Any) -> None:
        from confluent_kafka import KafkaError, KafkaException

        raise KafkaException(KafkaError(KafkaError._TRANSPORT))

    def poll(self, timeout: float = 0) -> int:
        return int(self.real.poll(timeout))

    def flush(self, timeout: float = 0) -> int:
        return int(self.real.flush(timeout))
