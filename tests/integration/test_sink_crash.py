"""Sink workers under failure: kill -9 or SIGTERM under load (and a storm of transient failures
and slow answers) loses nothing (duplicates carry the
same Idempotency-Key; SIGTERM exits within the grace period), no undelivered offset is ever
committed, poison input goes dead with its coordinates while the worker keeps going."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from tests.integration.test_sink_support import (
    EventProducer,
    Req,
    Resp,
    create_topic,
    read_topic,
    sink_thread,
    target,
    tasks,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

GRACE_S = 20  # the pod's terminationGracePeriodSeconds allows more; a stop must fit well within


def start_worker(cfg: Path, route: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "sink", "run", route,
                             "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def route_yaml(url: str, topic: str, extra: str = "") -> str:
    return f"""
  - name: crash
    topics: [{topic}]
    concurrency: 3
    batch_size: 50
    retry: {{max_attempts: 100, backoff_base_s: 0.05, backoff_max_s: 0.2}}
    connector: {{type: http, url: "{url}/items/{{$key.id}}"}}
{extra}"""


def storm(r: Req, n: int) -> Resp:
    """A flaky, sometimes slow target: about 10% of events fail their first attempt (500, 503,
    429), about 3% answer slowly."""
    h = zlib.crc32(r.headers["idempotency-key"].encode()) % 100
    if n == 1 and h < 10:
        return [Resp(500), Resp(503), Resp(429, headers={"Retry-After": "0"})][h % 3]
    return Resp(200, delay_s=0.05 if h >= 97 else 0.001)


def committed_offsets(stack: Any, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": "dx-sink-crash"})
    try:
        found = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        c.close()
    return {tp.partition: tp.offset for tp in found}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_stop_under_load_loses_nothing_and_duplicates_share_the_idempotency_key(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path, sig: signal.Signals) -> None:
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic, partitions=2)
    n_keys, per_key = 8, 60
    with target(storm) as srv:
        # the killed member stays in the group until its session times out: keep that short
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                           route_yaml(srv.url, topic), client={"session.timeout.ms": 6000})
        prod = EventProducer(stack, topic, topic_prefix)
        for seq in range(per_key):
            for k in range(n_keys):
                prod.send(k, seq=seq)
        prod.flush()
        event_ids = {e["event_id"] for e in prod.sent}

        proc = start_worker(cfg, "crash")
        wait_for(lambda: len(srv.received()) >= 150 or proc.poll() is not None, 90,
                 what="the worker to be under load")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=GRACE_S)
        if sig == signal.SIGTERM:
            assert proc.returncode == 0, err
        at_stop = srv.received()
        assert len(at_stop) < len(event_ids)  # stopped mid-stream, not after the end
        # every offset the group committed was delivered before the worker went away
        delivered = {r.headers["idempotency-key"] for r in at_stop if abs(r.status) == 200}
        committed = committed_offsets(stack, topic, 2)
        messages = read_topic(stack, topic, len(event_ids))
        assert len(messages) == len(event_ids)
        undelivered_but_committed = [
            (m.partition(), m.offset()) for m in messages
            if m.offset() < committed[m.partition()]
            and dict(m.headers())["dx.event_id"].decode() not in delivered]
        assert undelivered_but_committed == []
        if sig == signal.SIGTERM:  # a clean stop commits what was delivered
            assert sum(max(0, o) for o in committed.values()) > 0

        proc = start_worker(cfg, "crash")
        try:
            def all_succeeded() -> bool:
                rows = tasks(pg_db, "crash")
                return len(rows) == len(event_ids) and all(
                    r["status"] == "succeeded" for r in rows)

            wait_for(all_succeeded, 120, what="every event to be delivered after restart")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err

    # a request cut off by kill -9 reaches the server with a partial body: not a delivery
    received = [r for r in srv.received()
                if len(r.body) == int(r.headers.get("content-length", len(r.body)))]
    by_key: dict[str, set[bytes]] = defaultdict(set)
    for r in received:
        by_key[r.headers["idempotency-key"]].add(r.body)
    assert set(by_key) == event_ids                       # nothing lost, nothing invented
    assert all(len(bodies) == 1 for bodies in by_key.values())  # a duplicate is the same event
    # per key, first deliveries came in order (a redelivery after the crash repeats a suffix)
    first: dict[int, list[int]] = defaultdict(list)
    seen: set[str] = set()
    for r in received:
        if r.headers["idempotency-key"] not in seen:
            seen.add(r.headers["idempotency-key"])
            first[r.json["id"]].append(r.json["seq"])
    assert all(seqs == list(range(per_key)) for seqs in first.values()), first


def test_sigterm_stops_without_committing_undelivered_offsets(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)
    healthy = {"on": False}

    def script(r: Req, n: int) -> Resp:
        return Resp(200) if healthy["on"] else Resp(503, '{"error": "maintenance"}')

    with target(script) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                           route_yaml(srv.url, topic))
        prod = EventProducer(stack, topic, topic_prefix)
        for k in range(5):
            prod.send(k, seq=0)
        prod.flush()
        proc = start_worker(cfg, "crash")
        wait_for(lambda: len(srv.received()) >= 6, 60, what="a few failing attempts")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "stopping" in err

        c = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": "dx-sink-crash"})
        committed = c.committed([TopicPartition(topic, 0)], timeout=10)
        c.close()
        assert committed[0].offset <= 0  # nothing past the first undelivered event
        statuses = {r["status"] for r in tasks(pg_db, "crash")}
        assert statuses <= {"failed", "retrying"} and "failed" in statuses

        healthy["on"] = True
        with sink_thread(cfg, "crash"):
            wait_for(lambda: [r["status"] for r in tasks(pg_db, "crash")] == ["succeeded"] * 5,
                     60, what="redelivery after restart")


def test_poison_input_is_dead_with_its_coordinates_and_the_worker_keeps_going(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)
    with target() as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                           route_yaml(srv.url, topic, """    mapping:
      fields:
        id: id
        n: {from: name, type: int}"""))
        prod = EventProducer(stack, topic, topic_prefix)
        good1 = prod.send(1, name="12")
        prod.send_raw(2, b"garbage")                             # undecodable bytes
        prod.send_raw(3, struct.pack(">bI", 0, 987654321) + b"x")  # unknown schema id
        bad_map = prod.send(4, name="twelve")                    # mapping fails
        parked = prod.send(2, name="13")                         # same key as the poison
        good5 = prod.send(5, name="14")
        prod.flush()
        with sink_thread(cfg, "crash"):
            rows = wait_for(lambda: (lambda rs: rs if len(rs) == 6 and all(
                r["status"] in ("succeeded", "dead", "pending") for r in rs) else None)(
                tasks(pg_db, "crash")), 60, what="six tasks")
        by_offset = {r["offset"]: r for r in rows}
        assert [by_offset[o]["status"] for o in range(6)] == [
            "succeeded", "dead", "dead", "dead", "pending", "succeeded"]
        assert by_offset[1]["error"].startswith(f"{topic}[0]@1: undecodable")
        assert by_offset[2]["error"] == (f"{topic}[0]@2: schema id 987654321 "
                                         "is not in the registry")
        assert by_offset[3]["error"].startswith(f"{topic}[0]@3: mapping n: cannot convert "
                                                "'twelve' to int")
        assert by_offset[3]["event_id"] == bad_map["event_id"]
        assert by_offset[4]["event_id"] == parked["event_id"]
        delivered = sorted((json.loads(r.body) for r in srv.received()), key=lambda d: d["id"])
        assert delivered == [{"id": 1, "n": 12}, {"id": 5, "n": 14}]
        assert {good1["event_id"], good5["event_id"]} == {
            r.headers["idempotency-key"] for r in srv.received()}
        dlq = read_topic(stack, f"{topic}.dlq", 3)
        by_offset_dlq = {int(dict(m.headers())["dx.dlq.offset"]): m for m in dlq}
        assert sorted(by_offset_dlq) == [1, 2, 3]  # lanes dead-letter in any order
        assert by_offset_dlq[1].value() == b"garbage"  # the original bytes, untouched
