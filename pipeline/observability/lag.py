"""Consumer lag of a running worker, from what its consumer already knows (no broker round trip).

``dx status`` asks Kafka for committed offsets and high watermarks; a worker does not need to:
librdkafka keeps each assigned partition's high watermark from the last fetch response, and the
worker knows what it committed (a sink) or stored with the applied rows (a source).
"""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaException, TopicPartition

from pipeline.observability.metrics import WorkerMetrics


def report_lag(consumer: Consumer, metrics: WorkerMetrics,
               partitions: Iterable[tuple[str, int, int | None]]) -> None:
    """Set ``dx_consumer_lag_messages`` for each ``(topic, partition, next offset)``: the cached
    high watermark minus the worker's committed/stored next offset, or its fetch position when
    it has none yet. Partitions not fetched yet are left alone."""
    for topic, partition, base in partitions:
        tp = TopicPartition(topic, partition)
        try:
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if base is None:
                base = consumer.position([tp])[0].offset
        except KafkaException:
            continue
        if high >= 0 and base is not None and base >= 0:
            metrics.lag(topic, partition, high - base)
