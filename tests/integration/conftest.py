"""Fixtures of the integration tier only (the stack itself is in ``tests/conftest.py``).

`capture_mode`: both capture modes, for capture/relay tests that must hold in each.

`connect`: one Kafka Connect worker (Debezium's PostgreSQL source and JDBC sink, Apicurio's Avro
converter; all from Maven Central through deploy/local/connect_worker.py) for the whole session,
started the first time a test asks for it and stopped at the end, its internal topics deleted.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "local"))

import connect_worker

#: both capture modes, for capture/relay tests that must hold in each
CAPTURE_MODES = ("logical", "trigger")


@pytest.fixture(params=CAPTURE_MODES)
def capture_mode(request: pytest.FixtureRequest) -> str:
    """Runs a test once with logical and once with trigger capture (``capture.mode``)."""
    return str(request.param)


@pytest.fixture(scope="session")
def connect(stack: Any) -> Iterator[connect_worker.Connect]:
    """The REST API of a running Connect worker that reads and writes the test stack."""
    name = f"pytest-{os.getpid()}"
    try:
        worker = connect_worker.start(name, stack.kafka_bootstrap, stack.schema_registry_url)
    except (connect_worker.ConnectError, connect_worker.stack.StackError) as exc:
        pytest.fail(f"Kafka Connect worker: {exc}", pytrace=False)
    try:
        yield connect_worker.Connect(worker.url)
    finally:
        connect_worker.stop(name)
        _delete_topics(stack.kafka_bootstrap, worker.internal_topics)


def _delete_topics(bootstrap: str, topics: tuple[str, ...]) -> None:
    from confluent_kafka.admin import AdminClient

    for future in AdminClient({"bootstrap.servers": bootstrap}).delete_topics(
        list(topics), operation_timeout=30
    ).values():
        with contextlib.suppress(Exception):  # already gone or never created: nothing to clean
            future.result(60)
