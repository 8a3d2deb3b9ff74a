"""Kafka itself failing under every worker at once, on the tier's own broker behind its proxy:
the broker killed (``kill -9``) and restarted, stopped gracefully and restarted, then the network
between the workers and Kafka cut (connections reset, new ones refused) and half-open (nothing
answers, nothing closes), each healed after a while. Running meanwhile: a relay in each delivery
mode under a writing application, a sink worker delivering the at-least-once relay's topic to an
HTTP target, and a source worker applying a topic that a third-party producer keeps writing.

dx promises: nothing lost anywhere, nothing repeated by the exactly-once relay, per-key order of
first occurrences (by ``event_id``) kept by the at-least-once relay, each worker recovering by
itself once Kafka is back and saying what is wrong in a line that names Kafka while it is cut
off."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer

from tests.faults.oracle import compare, outbox_count
from tests.faults.own_kafka import OwnKafka
from tests.faults.own_postgres import OwnPostgres
from tests.faults.supervisor import Supervisor
from tests.faults.test_sink_outages import route_yaml
from tests.integration.relay_support import TopicReader, dx, execute, write_config
from tests.integration.test_relay_resilience import ITEMS, TABLES
from tests.integration.test_sink_support import Resp, target, wait_for
from tests.integration.test_source_support import create_topic

KEYS = 10  # rows the application keeps updating: per-key order is checked on them
CUT_S = 8.0
HALF_OPEN_S = 12.0


def update_loop(url: str, stop: threading.Event, committed: list[tuple[int, int]]) -> None:
    """One UPDATE per transaction, round the keys, each with a new value (v = i): a change
    is the fact ``(id, v)``. PostgreSQL is not at fault here, so an error fails the drill."""
    with psycopg.connect(url, autocommit=True) as conn:
        i = KEYS
        while not stop.is_set():
            conn.execute("UPDATE items SET v = %s WHERE id = %s", (i, i % KEYS))
            committed.append((i % KEYS, i))
            i += 1
            time.sleep(0.05)


def produce_loop(bootstrap: str, topic: str, stop: threading.Event, sent: list[str]) -> None:
    """A third-party system writing the source topic through the same faults (an idempotent
    producer that never gives a message up)."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "message.timeout.ms": 0, "linger.ms": 5, "log_level": 0})
    i = 0
    while not stop.is_set():
        sku = f"s{i}"
        producer.produce(topic, key=json.dumps({"sku": sku}).encode(),
                         value=json.dumps({"sku": sku, "qty": i}).encode())
        producer.poll(0)
        sent.append(sku)
        i += 1
        time.sleep(0.05)
    assert producer.flush(120) == 0


def first_occurrence_order(events: list[Any]) -> list[str]:
    """Keys whose first occurrences (by event_id) are not in the order they were committed."""
    seen: set[str] = set()
    last: dict[int, int] = {}
    wrong = []
    for e in events:
        if not (e.value and e.value.get("after")) or e.value["event_id"] in seen:
            continue
        seen.add(e.value["event_id"])
        k, v = e.key["id"], e.value["after"]["v"]
        if v < last.get(k, -1):
            wrong.append(f"id {k}: {v} after {last[k]}")
        last[k] = max(v, last.get(k, -1))
    return wrong


@pytest.mark.timeout(600)
def test_kafka_restarts_partitions_and_half_open_under_every_worker(
        stack: Any, own_kafka: OwnKafka, own_postgres: OwnPostgres, tmp_path: Path) -> None:
    kstack = dataclasses.replace(stack, kafka_bootstrap=own_kafka.bootstrap)
    run = uuid.uuid4().hex[:8]
    eos_prefix, alo_prefix = f"kf{run}e", f"kf{run}a"
    eos_db = own_postgres.database(f"kafka_eos_{run}")
    alo_db = own_postgres.database(f"kafka_alo_{run}")
    rows = ", ".join(f"({k}, 0)" for k in range(KEYS))
    for db in (eos_db, alo_db):
        execute(db, ITEMS, f"INSERT INTO items (id, v) VALUES {rows}")
    execute(alo_db, "CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL)")
    alo_topic, source_topic = f"{alo_prefix}.public.items", f"{alo_prefix}.stock"
    create_topic(kstack, alo_topic)
    create_topic(kstack, source_topic)

    with target(lambda r, n: Resp(200)) as srv:
        sinks = route_yaml(srv.url, alo_topic, "{max_attempts: 100, backoff_base_s: 0.05, "
                           "backoff_max_s: 0.5}")
        # a consumer group member lost in a broker restart is replaced within seconds
        client = "  client: {session.timeout.ms: 6000}\n"
        extra = (f"sinks:\n{sinks}\nsources:\n  - name: stock\n    topic: {source_topic}\n"
                 "    format: json\n    table: stock\n    mode: upsert\n")
        eos_cfg = write_config(tmp_path / "eos.yaml", kstack, eos_db, eos_prefix, TABLES)
        alo_cfg = write_config(tmp_path / "alo.yaml", kstack, alo_db, alo_prefix, TABLES,
                               mode="at-least-once", extra=extra)
        alo_cfg.write_text(alo_cfg.read_text().replace(
            f"  topic_prefix: {alo_prefix}\n", f"  topic_prefix: {alo_prefix}\n{client}"))
        for cfg in (eos_cfg, alo_cfg):
            assert dx("capture", "install", "-c", str(cfg)).returncode == 0
        assert dx("init", "-c", str(alo_cfg)).returncode == 0, "dx init"
        logs = {name: tmp_path / f"{name}.log" for name in ("eos", "alo", "sink", "source")}
        workers = {
            "eos": Supervisor("relay", "-c", str(eos_cfg), log=logs["eos"]),
            "alo": Supervisor("relay", "-c", str(alo_cfg), log=logs["alo"]),
            "sink": Supervisor("sink", "run", "faults", "-c", str(alo_cfg), log=logs["sink"]),
            "source": Supervisor("source", "run", "stock", "-c", str(alo_cfg),
                                 log=logs["source"]),
        }
        stop = threading.Event()
        eos_committed: list[tuple[int, int]] = []
        alo_committed: list[tuple[int, int]] = []
        sent: list[str] = []
        threads = [
            threading.Thread(target=update_loop, args=(eos_db, stop, eos_committed)),
            threading.Thread(target=update_loop, args=(alo_db, stop, alo_committed)),
            threading.Thread(target=produce_loop, args=(kstack.kafka_bootstrap, source_topic,
                                                        stop, sent)),
        ]
        said: dict[str, dict[str, list[str]]] = {}
        try:
            for t in threads:
                t.start()
            flowing(srv, alo_db)
            own_kafka.restart("kill")
            flowing(srv, alo_db)
            own_kafka.restart("graceful")
            flowing(srv, alo_db)
            said["cut"] = during(logs, lambda: own_kafka.proxy.cut(), CUT_S, own_kafka)
            flowing(srv, alo_db)
            said["half-open"] = during(logs, lambda: own_kafka.proxy.blackhole(),
                                       HALF_OPEN_S, own_kafka)
            flowing(srv, alo_db)
            stop.set()
            for t in threads:
                t.join(180)
            wait_for(lambda: outbox_count(eos_db) == 0 and outbox_count(alo_db) == 0, 180,
                     what="both outboxes drained")
            events = read_all(kstack, alo_topic, len(alo_committed))
            alo_ids = {str(e.value["event_id"]) for e in events if e.value}
            # the verdicts below say what is missing if these never come true
            with contextlib.suppress(AssertionError):
                wait_for(lambda: alo_ids <= set(delivered_keys(srv)), 120, interval=0.5)
            with contextlib.suppress(AssertionError):
                wait_for(lambda: set(sent) <= set(applied(alo_db)), 120, interval=0.5)
            print(f"{time.strftime('%X')} all arrived", flush=True)
        finally:
            stop.set()
            for worker in workers.values():
                worker.stop()
        for name, worker in workers.items():
            for code, line in worker.exits:
                print(f"{name} exit {code}: {line}", flush=True)
        for fault, lines in said.items():
            for name, text in lines.items():
                print(f"{fault}: {name} said {len(text)} lines: {text[:3]}", flush=True)

    eos = compare("kafka restarts + partitions under the relay (exactly-once)", eos_committed,
                  [(e.key["id"], e.value["after"]["v"]) for e in
                   read_all(kstack, f"{eos_prefix}.public.items", len(eos_committed))
                   if e.key and e.value and e.value.get("after")])
    alo = compare("kafka restarts + partitions under the relay (at-least-once)", alo_committed,
                  [(e.key["id"], e.value["after"]["v"]) for e in events
                   if e.key and e.value and e.value.get("after")])
    sink = compare("kafka restarts + partitions under a sink", alo_ids, delivered_keys(srv))
    source = compare("kafka restarts + partitions under a source", sent, applied(alo_db))
    assert eos.lost == 0 and eos.dup == 0
    assert alo.lost == 0 and sink.lost == 0 and source.lost == 0 and source.dup == 0
    assert first_occurrence_order(events) == []
    # each worker said it could not reach Kafka in a line naming it (once per outage: the
    # faults here follow each other closely, so a worker may count two as one)
    quiet = [name for name, log in logs.items() if "kafka unreachable" not in log.read_text()]
    assert quiet == [], said

def flowing(srv: Any, db: str) -> None:
    """Every worker is moving again: the relays drain, the sink delivers, the source applies."""
    before = (len(delivered_keys(srv)), len(applied(db)))
    wait_for(lambda: all(a > b for a, b in zip((len(delivered_keys(srv)), len(applied(db))),
                                               before, strict=True)), 180, interval=0.3,
             what=f"every worker moving again (delivered, applied were {before})")
    print(f"{time.strftime('%X')} moving: delivered={len(delivered_keys(srv))} "
          f"applied={len(applied(db))}", flush=True)


def during(logs: dict[str, Path], fault: Callable[[], None], seconds: float,
           kafka: OwnKafka) -> dict[str, list[str]]:
    """Run ``fault`` for ``seconds``, heal; the lines each worker wrote meanwhile."""
    marks = {name: log.stat().st_size if log.exists() else 0 for name, log in logs.items()}
    fault()
    time.sleep(seconds)
    said = {}
    for name, log in logs.items():
        with log.open() as f:
            f.seek(marks[name])
            said[name] = [ln for ln in f.read().splitlines() if ln.strip()]
    kafka.proxy.heal()
    return said


def delivered_keys(srv: Any) -> list[str]:
    return [r.headers.get("idempotency-key") for r in srv.received() if r.status == 200]


def applied(db: str) -> list[str]:
    with psycopg.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT sku FROM stock")]



def read_all(stack: Any, topic: str, expect: int) -> list[Any]:
    reader = TopicReader(stack, topic)
    try:
        return reader.read(until=expect, timeout_s=120, settle_s=1)
    finally:
        reader.close()
