"""One line per Kafka outage, however often librdkafka reports it (pipeline/observability/
kafka_outage.py)."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import KafkaError

from pipeline.observability import kafka_outage


def test_one_line_per_outage_then_again_after_a_quiet(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(kafka_outage.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(kafka_outage, "_last", {})
    producer = kafka_outage.outage_reporter("k1:9092")
    consumer = kafka_outage.outage_reporter("k1:9092")
    caplog.set_level(logging.WARNING, logger="dx.kafka")
    for _ in range(5):  # two clients of one worker, reporting every few seconds
        producer(KafkaError(KafkaError._ALL_BROKERS_DOWN))
        consumer(KafkaError(KafkaError._ALL_BROKERS_DOWN))
        consumer(KafkaError(KafkaError._TRANSPORT))  # one connection: not an outage
        now[0] += 3
    assert [r.getMessage() for r in caplog.records] == [
        "kafka unreachable at k1:9092: every broker is down or refusing connections; "
        "retrying until it is back"]
    now[0] += 60  # back meanwhile; a new outage is said at once
    producer(KafkaError(KafkaError._ALL_BROKERS_DOWN))
    assert len(caplog.records) == 2


def test_a_long_outage_is_said_again_each_minute(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(kafka_outage.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(kafka_outage, "_last", {})
    report = kafka_outage.outage_reporter("k2:9092")
    caplog.set_level(logging.WARNING, logger="dx.kafka")
    for _ in range(40):  # 200 s, a report every 5 s
        report(KafkaError(KafkaError._ALL_BROKERS_DOWN))
        now[0] += 5
    assert len(caplog.records) == 4  # at 0, 60, 120, 180 s
