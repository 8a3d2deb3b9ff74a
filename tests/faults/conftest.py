"""The fault-injection tier: the real stack driven through what production does to it (restores,
restarts, partitions, half-open connections, outages), each test ending with an oracle that
compares what the database committed with what arrived (``committed= delivered= lost= dup=``).

Everything here needs the stack, so it is marked ``integration`` as well as ``faults``
(``-m faults`` runs this tier alone)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.own_kafka import OwnKafka
from tests.faults.own_postgres import OwnPostgres

FAULTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if FAULTS in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def own_postgres() -> Iterator[OwnPostgres]:
    """A PostgreSQL instance this tier may restart and crash (see own_postgres.py)."""
    pg = OwnPostgres()
    try:
        yield pg
    finally:
        pg.close()


@pytest.fixture(scope="session")
def own_kafka() -> Iterator[OwnKafka]:
    """A Kafka broker this tier may kill, restart and partition, behind the tier's proxy (see
    own_kafka.py)."""
    kafka = OwnKafka()
    try:
        yield kafka
    finally:
        kafka.close()
