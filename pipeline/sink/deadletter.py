"""The dead-letter producer of a sink route: the original message plus the ``dx.dlq.*``
headers of :mod:`pipeline.events.deadletter` (the one vocabulary, shared with source routes)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient

from pipeline.config.model import KafkaConfig
from pipeline.errors import DxError, ServiceUnavailable
from pipeline.events.deadletter import dead_letter_headers, truncated_headers
from pipeline.events.topics import ensure_topics, topic_spec
from pipeline.observability.logging import KAFKA_LOG
from pipeline.sink.work import Work

log = logging.getLogger(__name__)

KafkaHeaders = list[tuple[str, str | bytes | None]]


def dlq_headers(route: str, w: Work, reason: str, err: DxError) -> KafkaHeaders:
    kind = "transient" if err.transient else "terminal"
    return list[tuple[str, str | bytes | None]](dead_letter_headers(
        route=route, topic=w.topic, partition=w.partition, offset=w.offset, error=reason,
        error_class=f"{kind}:{type(err).__name__}", attempts=w.attempts))


class DeadLetters:
    """Produces dead letters and waits for the broker's acknowledgement. Thread-safe."""

    def __init__(self, kafka: KafkaConfig, route: Any, stop: threading.Event) -> None:
        self.kafka = kafka
        self.route = route
        self.stop = stop
        conf = kafka.librdkafka()
        self.producer = Producer({**conf, "enable.idempotence": True, "linger.ms": 5},
                                 logger=KAFKA_LOG)
        self._admin = AdminClient(conf, logger=KAFKA_LOG)
        self._topics: set[str] = set()

    def close(self) -> None:
        self.producer.flush(5)

    def send(self, w: Work, reason: str, err: DxError) -> dict[str, Any] | None:
        """Produce the original message to the dead-letter topic and wait for the broker.

        Retries until the broker acknowledges, or returns None when the worker stops first. A
        message too large for Kafka is dead-lettered as a truncated copy: the value replaced by
        a short marker (the original stays in the task store)."""
        topic = self.route.dead_letter_topic(w.topic)
        dx_headers = dlq_headers(self.route.name, w, reason, err)
        key, value = w.raw_key, w.raw_value
        headers: KafkaHeaders = [*w.headers, *dx_headers]
        truncated = False
        result: dict[str, Any] = {}
        done = threading.Event()

        def delivered(kerr: KafkaError | None, msg: Message) -> None:
            if kerr is not None:
                result["error"] = str(kerr)
                result["code"] = kerr.code()
            else:
                result.update(topic=msg.topic(), partition=msg.partition(), offset=msg.offset())
            done.set()

        def too_large(code: int) -> bool:
            nonlocal key, value, headers, truncated
            if code != KafkaError.MSG_SIZE_TOO_LARGE or truncated:
                return False
            size = len(w.raw_key or b"") + len(w.raw_value) + sum(
                len(k) + len(v or b"") for k, v in w.headers)
            log.warning("dead letter of %s too large for %s (%d bytes); producing a truncated "
                        "copy", w.coords(), topic, size)
            own = [(k, v) for k, v in w.headers if len(k) + len(v or b"") <= 1024][:32]
            key = w.raw_key if len(w.raw_key or b"") <= 4096 else None
            value = (f"[dx: value truncated, {len(w.raw_value)} bytes; the original is in the "
                     f"task store]").encode()
            headers = [*own, *dx_headers, *truncated_headers(size)]
            truncated = True
            return True

        while not self.stop.is_set():
            result.clear()
            done.clear()
            try:
                self._ensure_topic(topic)
            except ServiceUnavailable as unavailable:
                log.warning("%s; retrying", unavailable)
                self.stop.wait(1)
                continue
            try:
                self.producer.produce(topic, key=key, value=value, headers=headers,
                                      on_delivery=delivered)
            except BufferError:  # the local queue is full: let it drain
                self.producer.poll(0.5)
                continue
            except KafkaException as kexc:
                kerr = kexc.args[0]
                code = kerr.code() if isinstance(kerr, KafkaError) else None
                if code is not None and too_large(code):
                    continue
                log.warning("dead-letter produce to %s failed (%s); retrying", topic, kexc)
                self.stop.wait(1)
                continue
            stop_deadline: float | None = None
            while not done.is_set():
                self.producer.poll(0.1)
                if self.stop.is_set():
                    stop_deadline = stop_deadline or time.monotonic() + 10
                    if time.monotonic() > stop_deadline:
                        return None
            if "error" not in result:
                if truncated:
                    result["truncated"] = True
                return result
            if too_large(result.get("code", 0)):
                continue
            log.warning("dead-letter produce to %s failed (%s); retrying", topic, result["error"])
            self.stop.wait(1)
        return None

    def _ensure_topic(self, topic: str) -> None:
        """Create the dead-letter topic before the first dead letter goes to it (never left
        to broker auto-create). A broker that does not answer is retried by :meth:`send`; a
        refusal (not authorized, a policy) is a TerminalError that stops the worker."""
        if topic in self._topics:
            return
        ensure_topics(self._admin, [topic_spec(
            self.kafka, topic, f"dead-letter topic of sink route {self.route.name}")],
            timeout_s=15)
        self._topics.add(topic)
