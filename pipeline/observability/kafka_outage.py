"""One line when a worker loses Kafka: librdkafka retries a lost broker by itself, forever and
quietly (its own log is kept at CRITICAL, see ``KAFKA_LOG``), so without this a worker cut off
from Kafka says nothing until a flush or a commit gives up, if ever. Given to a client as its
``error_cb``, :func:`outage_reporter` logs one warning when every broker is down or refusing
(a broker restart, a partition that resets connections): once per outage and cluster, however
many clients the worker has, and again each minute while it lasts."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import KafkaError

log = logging.getLogger("dx.kafka")

#: reports closer together than this are one outage (librdkafka repeats the report while it
#: retries); a report after a longer quiet starts a new outage, which is said at once
QUIET_S = 10.0
#: a long outage is said again this often, so a log search for the last minutes finds it
REPEAT_S = 60.0
_last: dict[str, tuple[float, float]] = {}  # cluster -> (last report, last line)
_lock = threading.Lock()


def outage_reporter(bootstrap: str) -> Callable[[KafkaError], None]:
    def report(err: KafkaError) -> None:
        if err.code() != KafkaError._ALL_BROKERS_DOWN:
            return  # single connection errors: librdkafka reconnects, and the next says enough
        now = time.monotonic()
        with _lock:
            reported, said = _last.get(bootstrap, (-QUIET_S - 1, -REPEAT_S - 1))
            say = now - reported > QUIET_S or now - said >= REPEAT_S
            _last[bootstrap] = (now, now if say else said)
        if say:
            log.warning("kafka unreachable at %s: every broker is down or refusing "
                        "connections; retrying until it is back", bootstrap)

    return report
