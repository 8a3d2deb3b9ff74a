"""One line when a worker loses Kafka: librdkafka retries a lost broker by itself, forever and
quietly (its own log is kept at CRITICAL, see ``KAFKA_LOG``), so without this a worker cut off
from Kafka says nothing until a flush or a commit gives up, if ever. Given to a client as its
``error_cb``, :func:`outage_reporter` logs one warning when every broker is down or refusing
(a broker restart, a partition that resets connections), at most once a minute per cluster and
process however many clients the worker has."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import KafkaError

log = logging.getLogger("dx.kafka")

#: a long outage is said again this often, so a log search for the last minutes finds it
REPEAT_S = 60.0
_said: dict[str, float] = {}
_lock = threading.Lock()


def outage_reporter(bootstrap: str) -> Callable[[KafkaError], None]:
    def report(err: KafkaError) -> None:
        if err.code() != KafkaError._ALL_BROKERS_DOWN:
            return  # single connection errors: librdkafka reconnects, and the next says enough
        now = time.monotonic()
        with _lock:
            if now - _said.get(bootstrap, -REPEAT_S) < REPEAT_S:
                return
            _said[bootstrap] = now
        log.warning("kafka unreachable at %s: every broker is down or refusing connections; "
                    "retrying until it is back", bootstrap)

    return report
