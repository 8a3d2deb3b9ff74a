"""A schema registry outage while a sink worker decodes keys: the worker waits and tries again
with its heartbeat going (a liveness probe must not restart it), says so in one line, and once
the registry answers every event arrives. Before, the ServiceUnavailable of a key decode left
the consumer loop and stopped the worker.

The worker starts with the registry already unreachable, so no key schema is cached: the very
first key needs the registry. Both outages of the fault tier's proxy are drilled: a cut
(connections refused) and a black hole (a half-open connection: each request waits its whole
timeout)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from pipeline.observability.server import WorkerServer
from tests.faults.oracle import compare
from tests.faults.proxy import Proxy
from tests.integration.relay_support import dx
from tests.integration.test_sink_support import (
    EventProducer,
    Resp,
    create_topic,
    sink_thread,
    target,
    tasks,
    wait_for,
    write_config,
)

#: longer than one registry request (5 s timeout) plus the worker's wait between tries
HEARTBEAT_S = 12.0
OUTAGE_S = 16.0


@pytest.mark.parametrize("outage", ["cut", "blackhole"])
def test_registry_outage_while_decoding_keys_waits_and_loses_nothing(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path, outage: str,
        caplog: pytest.LogCaptureFixture) -> None:
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic, partitions=2)
    prod = EventProducer(stack, topic, topic_prefix)  # registers the schemas (registry up)
    for k in range(30):
        prod.send(k % 10, seq=k)
    prod.flush()
    registry = urlsplit(stack.schema_registry_url)
    proxy = Proxy(int(registry.port or 80))
    proxy.cut() if outage == "cut" else proxy.blackhole()
    proxied = dataclasses.replace(stack, schema_registry_url=stack.schema_registry_url.replace(
        registry.netloc, proxy.address))
    server = WorkerServer.on_free_port(heartbeat_timeout_s=HEARTBEAT_S)
    caplog.set_level(logging.WARNING, logger="pipeline.sink.keyhold")
    try:
        with target(lambda r, n: Resp(200)) as srv:
            cfg = write_config(tmp_path / "dx.yaml", proxied, pg_db, topic_prefix, f"""
  - name: regout
    topics: [{topic}]
    concurrency: 2
    connector: {{type: http, url: "{srv.url}/items/{{$key.id}}"}}
""")
            assert dx("init", "-c", str(cfg)).returncode == 0
            with sink_thread(cfg, "regout", server=server):
                deadline = time.monotonic() + OUTAGE_S
                while time.monotonic() < deadline:
                    alive, detail = server.health()
                    assert alive, detail
                    time.sleep(0.3)
                assert srv.received() == []
                proxy.heal()
                committed = [e["event_id"] for e in prod.sent]
                wait_for(lambda: set(committed) <= {r.headers.get("idempotency-key")
                                                    for r in srv.received()}, 90,
                         what="every event at the target once the registry is back")
            got = [r.headers.get("idempotency-key") for r in srv.received()]
    finally:
        proxy.close()
        server.close()
    verdict = compare(f"registry outage under a sink's key decode ({outage})", committed, got)
    assert verdict.lost == 0
    assert not [t for t in tasks(pg_db, "regout") if t["status"] == "dead"]
    waits = [r.getMessage() for r in caplog.records if "cannot decode the key" in r.getMessage()]
    assert len(waits) == 1, waits  # one line for the outage, not one per message or try
    assert topic in waits[0] and "schema registry" in waits[0]
    assert any("answers again" in r.getMessage() for r in caplog.records)
