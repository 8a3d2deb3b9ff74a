"""Outages of a service the relay needs, cut at the TCP level by the fault tier's proxy: the
relay retries within its budget with its heartbeat going (a liveness probe must not restart it
meanwhile), and once the service is back every committed change arrives exactly once."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from prometheus_client import CollectorRegistry

from pipeline.config.loader import load_config
from pipeline.observability.metrics import DxMetrics
from pipeline.observability.server import WorkerServer
from pipeline.relay.observe import RelayObserver
from pipeline.relay.runner import Relay
from tests.faults.oracle import compare, topic_facts, wait_drained
from tests.faults.proxy import Proxy
from tests.integration.relay_support import TopicReader, captured_items, execute, write_config
from tests.integration.test_relay_resilience import TABLES
from tests.integration.test_sink_support import wait_for

#: shorter than the probes' 120 s so the test is quick, longer than one registry request (its
#: timeout, pipeline.events.wire.REGISTRY_TIMEOUT_S, plus the relay's first retry delay)
HEARTBEAT_S = 12.0
OUTAGE_S = 20.0


class CountingObserver(RelayObserver):
    retries = 0

    def retry(self) -> None:
        self.retries += 1
        super().retry()


@pytest.mark.parametrize("outage", [
    "cut",
    # a half-open connection: each registry request blocks for its whole timeout (5 s, the
    # client retrying none itself), so the relay's own retry loop beats between requests
    "blackhole",
])
def test_registry_outage_keeps_the_heartbeat_and_loses_nothing(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path, outage: str) -> None:
    captured_items(stack, pg_db, topic_prefix, tmp_path)
    registry = urlsplit(stack.schema_registry_url)
    proxy = Proxy(int(registry.port or 80))
    proxied = dataclasses.replace(stack, schema_registry_url=stack.schema_registry_url.replace(
        registry.netloc, proxy.address))
    cfg = write_config(tmp_path / "proxied.yaml", proxied, pg_db, topic_prefix, TABLES)
    server = WorkerServer.on_free_port(heartbeat_timeout_s=HEARTBEAT_S)
    observer = CountingObserver(load_config(cfg), server,
                                metrics=DxMetrics(CollectorRegistry()))
    relay = Relay(load_config(cfg), hooks=observer)
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _run(relay, errors), daemon=True)
    thread.start()
    committed: list[tuple[int, int]] = []
    try:
        wait_for(lambda: relay.stats.state == "active" or errors, 60, what="an active relay")
        execute(pg_db, "INSERT INTO items (id, v) VALUES (0, 0)")
        committed.append((0, 0))
        wait_drained(pg_db)  # started, and the items schemas are known
        proxy.cut() if outage == "cut" else proxy.blackhole()
        # a new subject needs the registry: this event and every change after it wait
        execute(pg_db, "SELECT dx.publish('order', '1', 'OrderPlaced', '{}')")
        for i in range(1, 21):
            execute(pg_db, f"INSERT INTO items (id, v) VALUES ({i}, {i})")
            committed.append((i, i))
        # an outage longer than the heartbeat timeout: alive all along
        deadline = time.monotonic() + OUTAGE_S
        while time.monotonic() < deadline:
            alive, detail = server.health()
            assert alive and not errors, (detail, errors)
            time.sleep(0.3)
        assert observer.retries >= 3 and not errors
        proxy.heal()
        wait_drained(pg_db)
    finally:
        relay.stop.set()
        proxy.close()  # resets whatever hangs on it
        thread.join(60)
        server.close()
    assert not errors, errors
    got = topic_facts(stack, f"{topic_prefix}.public.items", len(committed))
    verdict = compare(f"registry outage ({outage})", committed, got)
    assert verdict.lost == 0 and verdict.dup == 0
    orders = TopicReader(stack, f"{topic_prefix}.outbox.order")
    assert len(orders.read(until=1, settle_s=0.5)) == 1
    orders.close()


def _run(relay: Relay, errors: list[BaseException]) -> None:
    try:
        relay.run()
    except BaseException as err:
        errors.append(err)
