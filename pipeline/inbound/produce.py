"""Entities -> JSON messages on a source route's inbound topic, acknowledged before we go on.

Every inbound kind answers (webhook 2xx), advances (pull cursor) or moves a file (``done/``)
only after :meth:`InboundProducer.send` returned, which is after Kafka acknowledged every
message (``acks=all``, idempotent producer). A message Kafka did not take within the ack
timeout makes ``send`` raise :class:`ServiceUnavailable`; librdkafka's own delivery timeout is
set to the same value, so a message we gave up on is not delivered later behind our back
(and if one is, its deterministic event id makes the re-sent copy change nothing).

Messages are what the route's worker reads as ``format: json``: the key is the entity's key
fields as a JSON object (so a key stays in one partition, in order), the value the record, and
headers ``dx.event_id`` plus ``dx.inbound.*`` provenance (kind, page, item, file, line), which
the task log shows for an entity that fails.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from pipeline import db
from pipeline.config.model import DxConfig
from pipeline.config.sources import SourceRoute
from pipeline.errors import DxError, ServiceUnavailable
from pipeline.events.topics import ensure_route_topics
from pipeline.inbound.entities import canonical, event_id
from pipeline.observability.logging import KAFKA_LOG
from pipeline.observability.metrics import METRICS
from pipeline.source.catalog import Target, read_target

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OutMessage:
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    event_id: str


def read_route_target(config: DxConfig, route_name: str) -> tuple[int, SourceRoute, Target]:
    """The route and its checked target (CatalogError with the dx.yaml line)."""
    index, route = config.source(route_name)
    with db.connection(config.database.url.get_secret_value(),
                       application_name=f"dx-inbound-{route.name}",
                       connect_timeout_s=config.database.connect_timeout_s) as conn:
        target = read_target(conn, config, index)
    return index, route, target


class InboundProducer:
    """One per process and route; thread-safe (the webhook server calls it from many requests).

    A background thread polls the producer, so delivery reports resolve each batch's future as
    soon as Kafka answers, whichever thread produced it.
    """

    def __init__(self, config: DxConfig, route: SourceRoute, target: Target, *,
                 ack_timeout_s: float) -> None:
        self.kafka = config.kafka
        self.route = route
        self.bootstrap = config.kafka.bootstrap_servers
        self.key_fields = [route.field_for(c) for c in target.key]
        self.id_fields = route.inbound.id_fields if route.inbound is not None else None
        self.ack_timeout_s = ack_timeout_s
        #: role "inbound": received = entities taken in (produced), delivered = acknowledged by
        #: Kafka, failed transient = a batch Kafka refused, failed terminal = refused entities
        self.metrics = METRICS.worker("inbound", route.name)
        self.producer = Producer(config.kafka.librdkafka({
            "client.id": f"dx-inbound-{route.name}", "enable.idempotence": True, "acks": "all",
            "linger.ms": 5, "compression.type": "lz4",
            "message.timeout.ms": int(ack_timeout_s * 1000)}), logger=KAFKA_LOG)
        self._topics_made = False
        self._topics_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name=f"dx-inbound-{route.name}-acks",
                                        daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    def close(self) -> None:
        self._stop.set()
        self._poller.join(5)
        self.producer.flush(min(self.ack_timeout_s, 10))

    def message(self, record: Mapping[str, Any], provenance: Mapping[str, str | int]
                ) -> OutMessage:
        """The message of one route record (fields in the route's terms)."""
        eid = event_id(self.route.name, record, self.id_fields)
        key = None
        if all(record.get(f) is not None for f in self.key_fields):
            key = canonical({f: record[f] for f in self.key_fields}).encode()
        headers = (("dx.event_id", eid.encode()),
                   *((f"dx.inbound.{k}", str(v).encode()) for k, v in provenance.items()))
        return OutMessage(key, canonical(record).encode(), headers, eid)

    def submit(self, messages: Sequence[OutMessage]) -> concurrent.futures.Future[int]:
        """Produce ``messages``; the future resolves (to their count) when Kafka acknowledged
        all of them, or fails with :class:`ServiceUnavailable` on the first refusal."""
        done: concurrent.futures.Future[int] = concurrent.futures.Future()
        if not messages:
            done.set_result(0)
            return done
        left = [len(messages)]
        lock = threading.Lock()
        self.metrics.received(self.route.topic, len(messages))
        done.add_done_callback(self._count_failure)
        try:
            self._ensure_topics()
        except DxError as err:
            done.set_exception(err)
            return done

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            with lock:
                if done.done():
                    return
                if err is not None:
                    done.set_exception(self._unavailable(f"not acknowledged: {err.str()}"))
                    return
                left[0] -= 1
                if left[0] == 0:
                    self.metrics.delivered(self.route.topic, len(messages))
                    done.set_result(len(messages))

        for m in messages:
            while True:
                try:
                    self.producer.produce(self.route.topic, key=m.key, value=m.value,
                                          headers=list(m.headers), on_delivery=delivered)
                    break
                except BufferError:
                    self.producer.poll(0.05)  # the local queue is full: wait for acks
                except KafkaException as err:
                    with lock:
                        if not done.done():
                            done.set_exception(self._unavailable(str(err)))
                    return done
        return done

    def _ensure_topics(self) -> None:
        """The route's topics exist before the first message goes to them (never left to
        broker auto-create); tried again on the next batch after a failure."""
        if self._topics_made:
            return
        with self._topics_lock:
            if not self._topics_made:
                try:
                    ensure_route_topics(self.kafka, self.route, timeout_s=self.ack_timeout_s)
                except ServiceUnavailable as err:
                    raise self._unavailable(f"topics not created: {err.detail}") from None
                self._topics_made = True

    def _count_failure(self, fut: concurrent.futures.Future[int]) -> None:
        if fut.exception() is not None:
            self.metrics.failed("transient")

    def send(self, messages: Sequence[OutMessage]) -> int:
        """:meth:`submit` and wait for the acknowledgements (at most the ack timeout)."""
        fut = self.submit(messages)
        try:
            return fut.result(self.ack_timeout_s + 5)
        except concurrent.futures.TimeoutError:
            raise self._unavailable(f"{len(messages)} message(s) not acknowledged within "
                                    f"{self.ack_timeout_s:g}s") from None

    def _unavailable(self, detail: str) -> ServiceUnavailable:
        return ServiceUnavailable("kafka", self.bootstrap, f"{self.route.topic}: {detail}")
