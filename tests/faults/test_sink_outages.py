"""A sink worker through what production does to it: PostgreSQL (its task store) restarted and
crashed under it, on an instance of the tier's own, with the worker restarted the way an
orchestrator would; and a target down for longer than the retry budget, then back. The oracle
counts distinct ``Idempotency-Key``s at the target (the sink delivers at least once)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.faults.oracle import compare
from tests.faults.own_postgres import OwnPostgres
from tests.faults.supervisor import Supervisor
from tests.integration.relay_support import dx
from tests.integration.test_sink_support import (
    EventProducer,
    Resp,
    create_topic,
    target,
    tasks,
    wait_for,
    write_config,
)


def route_yaml(url: str, topic: str, retry: str) -> str:
    return f"""
  - name: faults
    topics: [{topic}]
    concurrency: 2
    batch_size: 20
    retry: {retry}
    connector: {{type: http, url: "{url}/items/{{$key.id}}"}}
"""


def test_postgres_restart_and_crash_under_a_sink(stack: Any, own_postgres: OwnPostgres,
                                                 topic_prefix: str, tmp_path: Path) -> None:
    db = own_postgres.database(f"sink_{uuid.uuid4().hex[:8]}")
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic, partitions=2)
    with target(lambda r, n: Resp(200, delay_s=0.002)) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, db, topic_prefix, route_yaml(
            srv.url, topic, "{max_attempts: 100, backoff_base_s: 0.05, backoff_max_s: 0.5}"),
            client={"session.timeout.ms": 6000})
        assert dx("init", "-c", str(cfg)).returncode == 0
        prod = EventProducer(stack, topic, topic_prefix)
        supervisor = Supervisor("sink", "run", "faults", "-c", str(cfg))
        try:
            for mode in ("fast", "immediate"):
                for k in range(150):
                    prod.send(k % 20, seq=k)
                prod.flush()
                time.sleep(1.5)
                own_postgres.stop(mode)
                time.sleep(1)
                own_postgres.start()
            committed = [e["event_id"] for e in prod.sent]
            wait_for(lambda: set(committed) <= {r.headers.get("idempotency-key")
                                                for r in srv.received()}, 120,
                     what="every event at the target")
        finally:
            supervisor.stop()
    for code, line in supervisor.exits:
        print(f"sink exit {code}: {line}", flush=True)
    got = [r.headers.get("idempotency-key") for r in srv.received()]
    verdict = compare("postgresql restart + crash under a sink", committed, got)
    assert verdict.lost == 0


def down_then_back(stack: Any, db: str, topic_prefix: str, tmp_path: Path, scenario: str,
                   meanwhile: Callable[[], None] = lambda: None) -> None:
    """The target answers 503 for longer than the retry budget takes (the circuit breaker
    pauses the route), ``meanwhile`` runs, the target comes back: every event arrives by
    itself and no task went dead because the target was down."""
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)
    down = threading.Event()
    down.set()
    with target(lambda r, n: Resp(503) if down.is_set() else Resp(200)) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, db, topic_prefix, route_yaml(
            srv.url, topic, "{max_attempts: 3, backoff_base_s: 0.05, backoff_max_s: 0.1}\n"
            "    breaker: {failures: 3, probe_initial_s: 0.5, probe_max_s: 1.0}"))
        assert dx("init", "-c", str(cfg)).returncode == 0
        prod = EventProducer(stack, topic, topic_prefix)
        for k in range(30):
            prod.send(k % 5, seq=k)
        prod.flush()
        committed = [e["event_id"] for e in prod.sent]
        supervisor = Supervisor("sink", "run", "faults", "-c", str(cfg))
        try:
            wait_for(lambda: len(srv.received()) >= 6, 60, what="failed attempts")
            time.sleep(3)  # well past 3 attempts with 0.1 s backoff
            meanwhile()
            down.clear()  # the target is back
            wait_for(lambda: set(committed) <= {r.headers.get("idempotency-key")
                                                for r in srv.received() if r.status == 200},
                     60, what="every event delivered once the target is back")
        finally:
            supervisor.stop()
            got = [r.headers.get("idempotency-key") for r in srv.received() if r.status == 200]
            compare(scenario, committed, got)
    assert [t for t in tasks(db, "faults") if t["status"] == "dead"] == []


def test_target_down_past_the_retry_budget_then_back(stack: Any, pg_db: str, topic_prefix: str,
                                                     tmp_path: Path) -> None:
    down_then_back(stack, pg_db, topic_prefix, tmp_path,
                   "target down past the retry budget, then back")


def test_target_down_and_postgres_restarted_then_back(stack: Any, own_postgres: OwnPostgres,
                                                      topic_prefix: str,
                                                      tmp_path: Path) -> None:
    db = own_postgres.database(f"down_{uuid.uuid4().hex[:8]}")

    def restart() -> None:
        own_postgres.stop("fast")
        own_postgres.start()

    down_then_back(stack, db, topic_prefix, tmp_path,
                   "target down, PostgreSQL restarted, then back", restart)
