"""The convergence rules of two-way sync (README, "Two-way sync"), end to end: capture, relay,
sink routes delivering over HTTP to real servers started here, and source routes applying what
those systems send back through Kafka.

* A strict target (it accepts only a newer version, and answers 409 to an equal one) and the
  database edit the same row concurrently to the same version: with ``conflict.ties:
  incoming`` dx yields on the tie, so both sides end on the target's row.
* Two systems that bump the version on every write they receive and send the row back: one edit
  in the database is delivered once to each and their echoes (only the version changed) are not
  written, so nothing travels on (it used to circulate forever between them).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer

from pipeline.config.loader import load_config
from pipeline.source.worker import SourceWorker
from tests.integration.relay_support import dx, execute, in_thread, relay_thread, write_config
from tests.integration.test_sink_support import Req, Resp, TargetServer, sink_thread, wait_for
from tests.integration.test_source_support import create_topic, produce, run_worker, stock_route


class System:
    """A third-party system: an HTTP server dx delivers to, holding rows by id, and a Kafka
    producer it sends its own changes with (to the topic a source route reads)."""

    def __init__(self, stack: Any, topic: str, accept: Callable[[dict[str, Any] | None,
                                                                 dict[str, Any]], bool],
                 echo: bool) -> None:
        self.topic, self.accept, self.echo = topic, accept, echo
        self.rows: dict[int, dict[str, Any]] = {}
        self.deliveries: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.producer = Producer({"bootstrap.servers": stack.kafka_bootstrap})
        self.server = TargetServer(self._handle)

    def _handle(self, req: Req, _: int) -> Resp:
        row = dict(req.json)
        with self.lock:
            self.deliveries.append(row)
            if not self.accept(self.rows.get(row["id"]), row):
                return Resp(409, '{"error": "stale version"}')
            if self.echo:  # stores it as its own write: a new version, sent back
                row["version"] += 1
            self.rows[row["id"]] = row
        if self.echo:
            self.send(row)
        return Resp(200)

    def edit(self, row: dict[str, Any]) -> None:
        """A user's edit in this system, sent to dx."""
        with self.lock:
            self.rows[row["id"]] = row
        self.send(row)

    def send(self, row: dict[str, Any]) -> None:
        self.producer.produce(self.topic, key=json.dumps({"id": row["id"]}),
                              value=json.dumps(row))
        assert self.producer.flush(30) == 0

    def row(self, id_: int) -> dict[str, Any] | None:
        with self.lock:
            return self.rows.get(id_)


def strict(stored: dict[str, Any] | None, incoming: dict[str, Any]) -> bool:
    return stored is None or incoming["version"] > stored["version"]


def anything(stored: dict[str, Any] | None, incoming: dict[str, Any]) -> bool:
    return True


@contextmanager
def source_thread(config_path: Path, route: str) -> Iterator[SourceWorker]:
    worker = SourceWorker(load_config(config_path), route)

    def stop() -> None:
        worker.stopping = True

    with in_thread(worker.run, stop):
        yield worker


def routes(prefix: str, systems: dict[str, TargetServer]) -> str:
    out = "sinks:\n"
    for name, srv in systems.items():
        out += f"""  - name: to-{name}
    topics: [{prefix}.public.products]
    group_id: {prefix}-to-{name}
    target: {name}
    batch_size: 10
    connector:
      type: http
      url: {srv.url}/products/{{$key.id}}
      method: PUT
      ok_statuses: [409]
"""
    out += "sources:\n"
    for name in systems:
        out += f"""  - name: from-{name}
    topic: {prefix}.{name}.products
    group_id: {prefix}-from-{name}
    format: json
    origin: {name}
    table: products
    conflict: {{column: version, ties: incoming}}  # the strict ERP never yields on a tie
    batch_timeout_ms: 50
"""
    return out


def setup(stack: Any, pg_db: str, prefix: str, tmp_path: Path,
          systems: dict[str, System]) -> Path:
    execute(pg_db, "CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL, "
                   "price numeric(10, 2) NOT NULL, version bigint NOT NULL)")
    for topic in [f"{prefix}.public.products", *(s.topic for s in systems.values())]:
        create_topic(stack, topic)
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, prefix,
                       "  - name: products\n    columns: [id, name, price, version]\n",
                       extra=routes(prefix, {n: s.server for n, s in systems.items()}))
    res = dx("capture", "install", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    return cfg


def db_row(pg_db: str, id_: int) -> dict[str, Any] | None:
    with psycopg.connect(pg_db) as conn:
        r = conn.execute("SELECT id, name, price, version FROM products WHERE id = %s",
                         (id_,)).fetchone()
    return None if r is None else {"id": r[0], "name": r[1], "price": float(r[2]),
                                   "version": r[3]}


def skipped(pg_db: str, route: str) -> list[str]:
    with psycopg.connect(pg_db) as conn:
        return [r[0] for r in conn.execute(
            "SELECT error FROM dx.task WHERE route = %s AND status = 'skipped' ORDER BY id",
            (route,)).fetchall()]


def test_a_tie_with_a_strict_target_converges(stack: Any, pg_db: str, topic_prefix: str,
                                             tmp_path: Path) -> None:
    erp = System(stack, f"{topic_prefix}.erp.products", strict, echo=False)
    cfg = setup(stack, pg_db, topic_prefix, tmp_path, {"erp": erp})
    with ExitStack() as running:
        running.enter_context(erp.server)
        running.enter_context(relay_thread(cfg))
        running.enter_context(sink_thread(cfg, "to-erp"))
        execute(pg_db, "INSERT INTO products VALUES (1, 'lamp', 10, 1)")
        wait_for(lambda: erp.row(1), 60, what="the first delivery")
        # Both sides edit version 1 -> 2 at the same time: the ERP's edit is on its way to dx
        # while the database's reaches the ERP, which refuses the equal version (409).
        erp.edit({"id": 1, "name": "lamp (erp)", "price": 12.0, "version": 2})
        execute(pg_db, "UPDATE products SET name = 'lamp (shop)', version = 2 WHERE id = 1")
        wait_for(lambda: len(erp.deliveries) == 2, 60, what="the refused delivery")
        assert erp.row(1) == {"id": 1, "name": "lamp (erp)", "price": 12.0, "version": 2}
        with source_thread(cfg, "from-erp"):
            wait_for(lambda: db_row(pg_db, 1) == erp.row(1), 60, what="convergence")
            erp.send({"id": 1, "name": "lamp (erp)", "price": 12.0, "version": 2})  # a replay
            wait_for(lambda: skipped(pg_db, "from-erp"), 60, what="the duplicate")
    assert db_row(pg_db, 1) == erp.row(1)
    assert skipped(pg_db, "from-erp") == ["field 'version': version 2 is already applied "
                                          "(duplicate)"]
    assert len(erp.deliveries) == 2  # the tie dx took from the ERP is not sent back to it


def test_two_echoing_systems_get_one_delivery_per_edit(stack: Any, pg_db: str,
                                                      topic_prefix: str,
                                                      tmp_path: Path) -> None:
    systems = {name: System(stack, f"{topic_prefix}.{name}.products", anything, echo=True)
               for name in ("pim", "erp")}
    cfg = setup(stack, pg_db, topic_prefix, tmp_path, systems)
    with ExitStack() as running:
        for system in systems.values():
            running.enter_context(system.server)
        running.enter_context(relay_thread(cfg))
        for name in systems:
            running.enter_context(sink_thread(cfg, f"to-{name}"))
            running.enter_context(source_thread(cfg, f"from-{name}"))
        execute(pg_db, "INSERT INTO products VALUES (7, 'desk', 99.5, 1)")
        # each system stores the row as its version 2 and sends it back: an echo, not written
        for name in systems:
            wait_for(partial(skipped, pg_db, f"from-{name}"), 60, what=f"{name}'s echo")
        execute(pg_db, "UPDATE products SET price = 89.5, version = 3 WHERE id = 7")
        for name in systems:
            route = f"from-{name}"
            wait_for(lambda: len(skipped(pg_db, route)) == 2, 60, what=f"{route}'s second echo")
    for name, system in systems.items():
        assert [d["price"] for d in system.deliveries] == [99.5, 89.5], name  # one per edit
        assert system.row(7) == {"id": 7, "name": "desk", "price": 89.5, "version": 4}
        assert skipped(pg_db, f"from-{name}") == [
            "field 'version': only the version changed (1 -> 2): an echo of the stored row, "
            "not written",
            "field 'version': only the version changed (3 -> 4): an echo of the stored row, "
            "not written"]
    assert db_row(pg_db, 7) == {"id": 7, "name": "desk", "price": 89.5, "version": 3}


@pytest.mark.parametrize("ties", ["incoming", "stored"])
def test_each_inbound_event_against_the_stored_row(ties: str, stack: Any, pg_db: str,
                                                   topic_prefix: str, tmp_path: Path) -> None:
    """The rules one by one, on stored row (1, 'a', 5): older, duplicate, echo, tie, newer."""
    topic, cfg = stock_route(
        stack, pg_db, topic_prefix, tmp_path,
        table="CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL, v int NOT NULL); "
              "INSERT INTO stock VALUES ('a', 5, 5), ('b', 5, 5), ('c', 5, 5), ('d', 5, 5), "
              "('e', 5, 5)",
        extra=f"    conflict: {{column: v, ties: {ties}}}\n")
    produce(stack, topic, [
        ({"sku": "a"}, {"sku": "a", "qty": 1, "v": 4}),   # older: skipped
        ({"sku": "b"}, {"sku": "b", "qty": 5, "v": 5}),   # the same row again: duplicate
        ({"sku": "c"}, {"sku": "c", "qty": 5, "v": 6}),   # only the version: an echo
        ({"sku": "d"}, {"sku": "d", "qty": 7, "v": 5}),   # a tie: conflict.ties decides
        ({"sku": "e"}, {"sku": "e", "qty": 8, "v": 6}),   # newer with new values: applied
    ])
    run_worker(cfg, "stock")
    with psycopg.connect(pg_db) as conn:
        stored = dict(conn.execute("SELECT sku, (qty, v)::text FROM stock").fetchall())
    tie = "(7,5)" if ties == "incoming" else "(5,5)"
    assert stored == {"a": "(5,5)", "b": "(5,5)", "c": "(5,5)", "d": tie, "e": "(8,6)"}
    expected = [
        "field 'v': version 4 is older than the current version 5",
        "field 'v': version 5 is already applied (duplicate)",
        "field 'v': only the version changed (5 -> 6): an echo of the stored row, not written"]
    if ties == "stored":
        expected.append("field 'v': version 5 is already applied with other values (a tie; "
                        "conflict.ties: stored keeps the stored row)")
    assert skipped(pg_db, "stock") == expected
