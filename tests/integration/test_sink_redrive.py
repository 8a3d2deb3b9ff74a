"""Redrives (``dx tasks retry`` / ``skip`` releasing parked keys) with several workers on a route
and across interruptions: each parked event is delivered once, in key order, by the worker that
owns its partition."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration.test_sink_support import (
    EventProducer,
    Req,
    Resp,
    create_topic,
    dx,
    sink_thread,
    target,
    tasks,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration


def route_yaml(url: str, topic: str, name: str = "redrive", extra: str = "") -> str:
    return f"""
  - name: {name}
    topics: [{topic}]
    concurrency: 2
    batch_size: 10
    retry: {{max_attempts: 3, backoff_base_s: 0.05, backoff_max_s: 0.2}}
    connector: {{type: http, url: "{url}/items/{{$key.id}}", method: PUT}}
{extra}"""


def accepted(received: list[Req]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for r in received:
        if r.status == 200 and r.json:
            out[r.json["id"]].append(r.json["seq"])
    return dict(out)


def test_two_workers_redrive_each_parked_event_once_in_order(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic, partitions=2)
    healthy = threading.Event()

    def script(r: Req, n: int) -> Resp:
        if (r.json or {}).get("behaviour") == "400" and not healthy.is_set():
            return Resp(400, '{"error": "sku missing"}')
        return Resp(200)

    n_keys, per_key, dead_keys = 8, 4, range(4)
    with target(script) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                           route_yaml(srv.url, topic))
        with sink_thread(cfg, "redrive") as w1, sink_thread(cfg, "redrive") as w2:
            wait_for(lambda: len(w1.partitions) == 1 and len(w2.partitions) == 1, 60,
                     what="one partition per worker")
            prod = EventProducer(stack, topic, topic_prefix)
            for seq in range(1, per_key + 1):
                for k in range(n_keys):
                    prod.send(k, seq=seq, behaviour="400" if k in dead_keys and seq == 1 else "ok")
            prod.flush()

            def settled() -> bool:
                st = [r["status"] for r in tasks(pg_db, "redrive")]
                return (len(st) == n_keys * per_key and st.count("dead") == len(dead_keys)
                        and st.count("pending") == len(dead_keys) * (per_key - 1))

            wait_for(settled, 60, what="dead keys to park")
            # the dead keys live on both partitions, so both workers have something to redrive
            dead_parts = {r["partition"] for r in tasks(pg_db, "redrive") if r["status"] == "dead"}
            assert dead_parts == {0, 1}
            healthy.set()
            out = dx(cfg, "tasks", "retry", "--all", "--route", "redrive", "--status", "dead")
            assert out.returncode == 0, out.stderr

            wait_for(lambda: all(r["status"] == "succeeded" for r in tasks(pg_db, "redrive")),
                     60, what="every parked event to be delivered")
            time.sleep(1.5)  # more redrive polls: a second worker redriving a key shows now
        got = accepted(srv.received())
        assert got == {k: list(range(1, per_key + 1)) for k in range(n_keys)}, got


def test_an_interrupted_redrive_stays_parked_and_is_redriven_after_a_restart(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)
    mode = {"seq1": "400"}

    def script(r: Req, n: int) -> Resp:
        if (r.json or {}).get("seq") == 1 and (r.json or {}).get("id") == 1:
            if mode["seq1"] == "400":
                return Resp(400, '{"error": "sku missing"}')
            if mode["seq1"] == "500":
                return Resp(500, '{"error": "down"}')
        return Resp(200)

    with target(script) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, route_yaml(
            srv.url, topic).replace("max_attempts: 3, backoff_base_s: 0.05, backoff_max_s: 0.2",
                                    "max_attempts: 50, backoff_base_s: 2, backoff_max_s: 3"))
        prod = EventProducer(stack, topic, topic_prefix)
        prod.send(1, seq=1)
        prod.send(2, seq=1)
        prod.flush()

        def first() -> dict[str, Any] | None:  # key 1's first event, at offset 0
            return next((r for r in tasks(pg_db, "redrive") if r["offset"] == 0), None)

        with sink_thread(cfg, "redrive"):
            wait_for(lambda: (r := first()) and r["status"] == "dead", 30,
                     what="the dead task")
            mode["seq1"] = "500"
            out = dx(cfg, "tasks", "retry", "--all", "--route", "redrive", "--status", "dead")
            assert out.returncode == 0, out.stderr
            wait_for(lambda: (r := first()) and r["status"] == "retrying", 30,
                     what="the redrive to back off")
        # stopped mid-backoff: not 'failed' (Kafka will not redeliver it), pending again
        row = first()
        assert row is not None and row["status"] == "pending" and row["redrive"], row

        # a kill -9 mid-backoff leaves it 'retrying': the key must still park after a restart
        with psycopg.connect(pg_db) as conn:
            conn.execute("UPDATE dx.task SET status = 'retrying' WHERE id = %s", (row["id"],))
        prod.send(1, seq=2)
        prod.flush()
        mode["seq1"] = "ok"
        with sink_thread(cfg, "redrive"):
            wait_for(lambda: len(rows := tasks(pg_db, "redrive")) == 3
                     and all(r["status"] == "succeeded" for r in rows), 30,
                     what="the interrupted redrive and the event behind it")
        assert accepted(srv.received())[1] == [1, 2]


def test_an_undecodable_event_parks_behind_an_earlier_event_of_its_key_that_goes_dead(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    """Issue 12/15: in one lane batch, event A of key 1 (refused by the target) and then an
    undecodable event B of key 1: A goes dead first, B parks behind it (it used to go dead
    before A was even sent)."""
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)
    with target(lambda r, n: Resp(400, '{"error": "sku"}') if r.json["seq"] == 1
                else Resp(200)) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                           route_yaml(srv.url, topic))
        prod = EventProducer(stack, topic, topic_prefix)
        prod.send(1, seq=1)
        prod.send_raw(1, b"\x00garbage")
        prod.send(2, seq=2)
        prod.send(2, seq=3)
        prod.flush()
        with sink_thread(cfg, "redrive"):
            wait_for(lambda: len(tasks(pg_db, "redrive")) == 4, 30, what="four tasks")
    by_offset = {r["offset"]: r for r in tasks(pg_db, "redrive")}
    assert [by_offset[o]["status"] for o in range(4)] == [
        "dead", "pending", "succeeded", "succeeded"]
    assert by_offset[0]["id"] < by_offset[1]["id"]


def test_retry_works_after_the_workers_database_connections_were_cut(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    """Issue 15: after a PostgreSQL restart the worker's redrive connection never reconnected,
    so ``dx tasks retry`` did nothing until the worker restarted. (The shared test server is not
    restarted: its backends are terminated, which is what a restart does to a connection.)"""
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)
    healthy = threading.Event()
    with target(lambda r, n: Resp(200) if healthy.is_set() else Resp(400)) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                           route_yaml(srv.url, topic))
        prod = EventProducer(stack, topic, topic_prefix)
        prod.send(1, seq=1)
        prod.send(1, seq=2)
        prod.flush()
        with sink_thread(cfg, "redrive"):
            wait_for(lambda: sorted(r["status"] for r in tasks(pg_db, "redrive"))
                     == ["dead", "pending"], 30, what="the key to park")
            with psycopg.connect(pg_db, autocommit=True) as conn:
                cut = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                    "datname = current_database() AND pid <> pg_backend_pid()").fetchone()
            assert cut is not None and cut[0] >= 1
            time.sleep(1)  # a redrive poll or two fail on the dead connections
            healthy.set()
            out = dx(cfg, "tasks", "retry", "--all", "--route", "redrive", "--status", "dead")
            assert out.returncode == 0, out.stderr
            wait_for(lambda: all(r["status"] == "succeeded" for r in tasks(pg_db, "redrive")),
                     60, what="the redrive after reconnecting")
    assert accepted(srv.received()) == {1: [1, 2]}


def test_a_redrive_cut_short_by_a_rebalance_goes_on_when_the_partition_comes_back(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    """A redrive under way when its partition is revoked is abandoned; when the partition comes
    back, the key must be redriven again (the lane used to keep the key marked 'redriving'
    forever, so it ignored every later redrive request and the key stayed parked)."""
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic, partitions=2)
    phase = {"now": "refuse"}  # refuse the seq-1 events, then 503 everything, then accept

    def script(r: Req, n: int) -> Resp:
        if phase["now"] == "refuse":
            return Resp(400) if (r.json or {}).get("seq") == 1 else Resp(200)
        return Resp(503) if phase["now"] == "down" else Resp(200)

    n_keys = 6
    with target(script) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, route_yaml(
            srv.url, topic, extra="    breaker: {probe_initial_s: 0.2, probe_max_s: 0.5}\n"))
        prod = EventProducer(stack, topic, topic_prefix)
        for seq in (1, 2):
            for k in range(n_keys):
                prod.send(k, seq=seq)
        prod.flush()
        with sink_thread(cfg, "redrive") as w1:
            wait_for(lambda: sorted(r["status"] for r in tasks(pg_db, "redrive"))
                     == ["dead"] * n_keys + ["pending"] * n_keys, 60, what="keys to park")
            phase["now"] = "down"
            seen = len(srv.received())
            out = dx(cfg, "tasks", "retry", "--all", "--route", "redrive", "--status", "dead")
            assert out.returncode == 0, out.stderr
            wait_for(lambda: len(srv.received()) > seen, 30, what="the redrive to start")
            with sink_thread(cfg, "redrive") as w2:  # takes a partition: the redrive is cut
                wait_for(lambda: len(w1.partitions) == 1 and len(w2.partitions) == 1, 60,
                         what="one partition per worker")
            wait_for(lambda: len(w1.partitions) == 2, 60, what="the partition to come back")
            phase["now"] = "up"
            wait_for(lambda: all(r["status"] == "succeeded" for r in tasks(pg_db, "redrive")),
                     30, what="every parked event to be delivered")
    got = accepted(srv.received())
    assert got == {k: [1, 2] for k in range(n_keys)}, got



def test_a_partition_taken_over_while_the_task_store_refuses_connections_waits_for_it(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    """A worker that takes a partition over reads which keys are parked. When the database
    refused that read, the worker went on without them and delivered a later event of a dead
    key past it; now the partition waits (paused) until the read succeeds."""
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)
    with target(lambda r, n: Resp(400) if r.json["seq"] == 1 else Resp(200)) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                           route_yaml(srv.url, topic))
        prod = EventProducer(stack, topic, topic_prefix)
        db = pg_db.rsplit("/", 1)[1]
        with psycopg.connect(stack.database_url, autocommit=True) as admin, ExitStack() as first:
            first.enter_context(sink_thread(cfg, "redrive"))
            try:
                with sink_thread(cfg, "redrive") as w2:  # joins owning nothing
                    prod.send(1, seq=1)  # goes dead at w1, after w2 read the parked keys
                    prod.flush()
                    wait_for(lambda: [r["status"] for r in tasks(pg_db, "redrive")] == ["dead"],
                             30, what="the key's first event to go dead")
                    admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
                    first.close()  # the partition moves to w2, which cannot read parked keys
                    wait_for(lambda: len(w2.partitions) == 1, 60, what="the take-over")
                    prod.send(1, seq=2)  # must park behind the dead seq 1
                    prod.send(2, seq=3)
                    prod.flush()
                    time.sleep(1.5)  # room for the old mistake: delivering seq 2 right away
                    admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
                    wait_for(lambda: len(tasks(pg_db, "redrive")) == 3, 30,
                             what="the new events' tasks")
            finally:
                admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
    assert sorted((r["offset"], r["status"]) for r in tasks(pg_db, "redrive")) == [
        (0, "dead"), (1, "pending"), (2, "succeeded")]
    assert accepted(srv.received()) == {2: [3]}


def test_a_redriven_task_does_not_go_dead_while_the_target_is_down(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    """A redriven task comes back with the attempts of its earlier run; its first transient
    failure used to exhaust the budget before the breaker saw enough failures in a row, so it
    went dead again because the target was down."""
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)
    phase = {"now": "refuse"}

    def script(r: Req, n: int) -> Resp:
        return {"refuse": Resp(400), "down": Resp(503)}.get(phase["now"], Resp(200))

    with target(script) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, route_yaml(
            srv.url, topic, extra="    breaker: {probe_initial_s: 0.1, probe_max_s: 0.2}\n"))
        prod = EventProducer(stack, topic, topic_prefix)
        prod.send(1, seq=1)
        prod.flush()
        with sink_thread(cfg, "redrive"):
            wait_for(lambda: [r["status"] for r in tasks(pg_db, "redrive")] == ["dead"], 30,
                     what="the event to go dead")
            with psycopg.connect(pg_db, autocommit=True) as conn:  # as if it had tried twice
                conn.execute("UPDATE dx.task SET attempts = 2")
            phase["now"] = "down"
            seen = len(srv.received())
            out = dx(cfg, "tasks", "retry", "--all", "--route", "redrive", "--status", "dead")
            assert out.returncode == 0, out.stderr
            wait_for(lambda: len(srv.received()) >= seen + 4, 30, what="redrive attempts")
            assert [r["status"] for r in tasks(pg_db, "redrive")] != ["dead"]
            phase["now"] = "up"
            wait_for(lambda: [r["status"] for r in tasks(pg_db, "redrive")] == ["succeeded"],
                     30, what="the redrive once the target is back")
