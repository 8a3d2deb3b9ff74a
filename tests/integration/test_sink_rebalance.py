"""Sink workers across a rebalance: work of a partition that moved to another worker is abandoned
by its old owner (not delivered again, not recorded, offset not committed) so the new owner's
deliveries of a key are never overtaken by the old owner's, and a copy that would have gone dead
at the old owner does not dead-letter or overwrite the new owner's ``succeeded`` task."""

from __future__ import annotations

import threading
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from connectors.base import key_text
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

LANES = 4


def keys_one_per_lane() -> dict[int, int]:
    """Key id -> partition: one key per lane of a worker (as ``SinkWorker.lane_for`` hashes),
    lanes 0-1 holding keys of partition 0 and lanes 2-3 keys of partition 1, so the worker is
    retrying an event of each partition at once whatever order Kafka hands them over in."""
    by_lane: dict[int, int] = {}
    k = 0
    while len(by_lane) < LANES:
        by_lane.setdefault(zlib.crc32(key_text({"id": k}).encode()) % LANES, k)
        k += 1
    return {k: 0 if lane < LANES // 2 else 1 for lane, k in by_lane.items()}


def send(prod: EventProducer, id: int, partition: int, seq: int) -> dict[str, Any]:
    env = prod.envelope(id, seq=seq)
    prod.producer.produce(prod.topic, key=prod.key.encode({"id": id}),
                          value=prod.value.encode(env), partition=partition,
                          headers=[("dx.event_id", env["event_id"].encode())])
    prod.producer.poll(0)
    return env


def route_yaml(url: str, topic: str, group: str, backoff_s: float) -> str:
    return f"""
  - name: reb
    topics: [{topic}]
    group_id: {group}
    concurrency: {LANES}
    batch_size: 10
    retry: {{max_attempts: 1000, backoff_base_s: {backoff_s}, backoff_max_s: {backoff_s},
             jitter: 0}}
    connector: {{type: http, url: "{url}", timeout_s: 5}}
"""


@pytest.mark.parametrize("old_owner_answer", [200, 400], ids=["old-would-succeed",
                                                              "old-would-go-dead"])
def test_a_moved_partition_is_not_delivered_by_its_old_owner(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path,
        old_owner_answer: int) -> None:
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic, partitions=2)
    group = f"{topic_prefix}-reb"
    keys, per_key = keys_one_per_lane(), 3
    state: dict[str, Any] = {"healthy": False, "moved": set()}
    partition_of: dict[str, int] = {}  # event_id -> partition
    lock = threading.Lock()

    def script(r: Req, n: int) -> Resp:
        with lock:
            healthy, moved = state["healthy"], state["moved"]
            part = partition_of.get(r.headers.get("idempotency-key", ""))
        old = r.path.startswith("/a/")
        if not healthy:  # slow failures: the old owner's lanes are mid-call or backing off
            return Resp(503, '{"error": "maintenance"}', delay_s=0.3 if old else 0.0)
        if old and part in moved:
            return Resp(old_owner_answer, '{"error": "rejected"}')
        return Resp(200)

    with target(script) as srv:
        # the old owner ("a") backs off long, the new owner ("b") retries fast: without the fix
        # the old owner's retry lands after the new owner has delivered the key
        cfg_a = write_config(tmp_path / "a.yaml", stack, pg_db, topic_prefix,
                             route_yaml(f"{srv.url}/a/items/{{$key.id}}", topic, group, 2.0))
        cfg_b = write_config(tmp_path / "b.yaml", stack, pg_db, topic_prefix,
                             route_yaml(f"{srv.url}/b/items/{{$key.id}}", topic, group, 0.05))
        prod = EventProducer(stack, topic, topic_prefix)
        for seq in range(per_key):
            for k, part in keys.items():
                send(prod, k, part, seq)
        prod.flush()
        messages = read_topic(stack, topic, len(keys) * per_key)
        assert len(messages) == len(keys) * per_key
        with lock:
            partition_of.update({dict(m.headers())["dx.event_id"].decode(): m.partition()
                                 for m in messages})
        assert set(partition_of.values()) == {0, 1}, "every partition should hold some keys"
        event_ids = set(partition_of)

        with sink_thread(cfg_a, "reb") as a:
            wait_for(lambda: len(a.owned()) == 2, 60, what="worker a to own both partitions")
            wait_for(lambda: {partition_of[r.headers["idempotency-key"]]
                              for r in srv.received() if r.path.startswith("/a/")} == {0, 1},
                     60, what="worker a to be retrying events of both partitions")
            with sink_thread(cfg_b, "reb") as b:
                wait_for(lambda: b.owned(), 60, what="a partition to move to worker b")
                handed_over = time.monotonic()
                moved = {p for _, p in b.owned()}
                assert len(moved) == 1 and {p for _, p in a.owned()} == {0, 1} - moved
                with lock:
                    state["moved"] = moved
                    state["healthy"] = True

                def all_succeeded() -> bool:
                    rows = tasks(pg_db, "reb")
                    return len(rows) == len(event_ids) and all(
                        r["status"] == "succeeded" for r in rows)

                wait_for(all_succeeded, 90, what="every event to succeed")
                time.sleep(2.5)  # longer than the old owner's backoff: a late retry would show

    received = srv.received()
    moved_ids = {e for e, p in partition_of.items() if p in moved}
    # the old owner sent nothing of the moved partition after handing it over
    late = [(r.path, r.json) for r in received if r.path.startswith("/a/")
            and r.headers["idempotency-key"] in moved_ids and r.at >= handed_over]
    assert late == []
    # per key of the moved partition: no request of the old owner after the new owner's first
    first_new: dict[str, float] = {}
    for r in received:
        if r.path.startswith("/b/"):
            first_new.setdefault(r.path, r.at)
    overtaken = [(r.path, r.json) for r in received if r.path.startswith("/a/")
                 and r.headers["idempotency-key"] in moved_ids
                 and r.at >= first_new.get(r.path.replace("/a/", "/b/", 1), float("inf"))]
    assert overtaken == []
    assert first_new, "the new owner delivered the moved partition's keys"

    ok = [r for r in received if r.status == 200]
    assert {r.headers["idempotency-key"] for r in ok} == event_ids  # every event delivered
    # per key, successful first deliveries in order (a redelivery repeats an earlier event)
    first: dict[int, list[int]] = defaultdict(list)
    seen: set[str] = set()
    for r in ok:
        if r.headers["idempotency-key"] not in seen:
            seen.add(r.headers["idempotency-key"])
            first[r.json["id"]].append(r.json["seq"])
    assert all(seqs == list(range(per_key)) for seqs in first.values()), first
    if old_owner_answer != 200:
        assert not [r for r in received if r.status == old_owner_answer]
        assert read_topic(stack, f"{topic}.dlq", 1, timeout=3) == []


def test_a_slow_target_does_not_let_the_old_owner_overwrite_after_the_hand_over(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    """Issue 15: ~150 ms a request and batches of 100: the old owner used to send its whole
    batch after the revoke had stopped waiting (the new owner's newer value got overwritten).
    Now ownership is checked before every request and ``timeout_s`` bounds each one."""
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic, partitions=2)
    group = f"{topic_prefix}-slow"
    keys, per_key = keys_one_per_lane(), 60  # a batch of 60 takes 9 s, the revoke waits 3 s
    partition_of: dict[str, int] = {}

    with target(lambda r, n: Resp(200, delay_s=0.15)) as srv:
        def cfg(name: str) -> Path:
            return write_config(tmp_path / f"{name}.yaml", stack, pg_db, topic_prefix, f"""
  - name: slow
    topics: [{topic}]
    group_id: {group}
    concurrency: {LANES}
    batch_size: 100
    connector: {{type: http, url: "{srv.url}/{name}/items/{{$key.id}}", timeout_s: 1}}
""")
        prod = EventProducer(stack, topic, topic_prefix)
        for seq in range(per_key):
            for k, part in keys.items():
                env = send(prod, k, part, seq)
                partition_of[env["event_id"]] = part
        prod.flush()
        with sink_thread(cfg("a"), "slow") as a:
            wait_for(lambda: len(a.owned()) == 2, 60, what="worker a to own both partitions")
            wait_for(lambda: len(srv.received()) >= 2 * LANES, 60, what="a to be delivering")
            with sink_thread(cfg("b"), "slow") as b:
                wait_for(lambda: b.owned(), 60, what="a partition to move to worker b")
                handed_over = time.monotonic()
                moved = {p for _, p in b.owned()}
                wait_for(lambda: len({r.headers["idempotency-key"] for r in srv.received()
                                      if r.status in (200, -200)}) == len(partition_of),
                         120, what="every event delivered")
    late = [r.path for r in srv.received() if r.path.startswith("/a/")
            and partition_of[r.headers["idempotency-key"]] in moved and r.at >= handed_over]
    assert late == []


def test_outcomes_on_the_wire_at_a_revoke_are_recorded_by_the_old_owner(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    """The revoke waits for calls on the wire so their outcomes are recorded and committed
    before the hand-over. A call used to count as done when the answer came, before its
    outcome was settled: the hand-over then went ahead, the old owner dead-lettered the event
    but did not record it, and the new owner sent it again and dead-lettered it a second
    time."""
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic, partitions=2)
    group = f"{topic_prefix}-reb"
    keys = keys_one_per_lane()  # each lane has a call on the wire for its partition
    with target(lambda r, n: Resp(400, '{"error": "refused"}', delay_s=3.0)) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                           route_yaml(f"{srv.url}/items/{{$key.id}}", topic, group, 0.05))
        prod = EventProducer(stack, topic, topic_prefix)
        for k, part in keys.items():
            send(prod, k, part, 1)
        prod.flush()
        with sink_thread(cfg, "reb") as w1:
            wait_for(lambda: len(srv.received()) == len(keys), 30, what="a call per lane")
            with sink_thread(cfg, "reb") as w2:
                wait_for(lambda: len(w1.partitions) == 1 and len(w2.partitions) == 1, 60,
                         what="one partition per worker")
                wait_for(lambda: [r["status"] for r in tasks(pg_db, "reb")]
                         == ["dead"] * len(keys), 30, what="every event dead")
    assert len(srv.received()) == len(keys)  # none sent twice
    assert len(read_topic(stack, f"{topic}.dlq", 2 * len(keys), timeout=3)) == len(keys)



def test_a_bulk_call_split_into_many_requests_stops_at_the_hand_over(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    """Issue 15: a refused bulk request is split into halves sent one after the other, many
    requests in one call (here dozens, 1 s each). The revoke waits only so long (the
    whole-request timeout + 2 s); the old owner used to go on sending halves after the
    hand-over, while the new owner was delivering the same keys."""
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic, partitions=2)
    group = f"{topic_prefix}-reb"
    partition_of = {k: k % 2 for k in range(32)}
    slow = {"on": True}  # the old owner's requests take 1 s each until the hand-over

    def script(r: Req, n: int) -> Resp:  # every record refused: a long split
        return Resp(422, '{"error": "refused"}',
                    delay_s=1.0 if r.path.startswith("/a/") and slow["on"] else 0.0)

    with target(script) as srv:
        def cfg(owner: str) -> Path:
            return write_config(tmp_path / f"{owner}.yaml", stack, pg_db, topic_prefix, f"""
  - name: reb
    topics: [{topic}]
    group_id: {group}
    concurrency: 1
    connector: {{type: http, url: "{srv.url}/x", timeout_s: 3,
                 bulk: {{url: "{srv.url}/{owner}/bulk"}}}}
""")
        prod = EventProducer(stack, topic, topic_prefix)
        for k, part in partition_of.items():
            send(prod, k, part, 1)
        prod.flush()
        with sink_thread(cfg("a"), "reb") as wa:
            wait_for(lambda: srv.received(), 30, what="the first bulk request")
            with sink_thread(cfg("b"), "reb") as wb:
                wait_for(lambda: len(wa.partitions) == 1 and len(wb.partitions) == 1, 60,
                         what="one partition per worker")
                handed_over = time.monotonic()
                slow["on"] = False
                moved = {p for _, p in wb.partitions}
                time.sleep(4)  # the old owner's split would go on for seconds
    late = [[i["id"] for i in r.json] for r in srv.received() if r.path.startswith("/a/")
            and r.at > handed_over and any(partition_of[i["id"]] in moved for i in r.json)]
    assert late == [], [(r.path, round(r.at - handed_over, 1)) for r in srv.received()]


def test_a_message_fetched_before_a_revoke_is_not_dispatched_after_it(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    """Review: one ``consume`` call serves the rebalance callback between messages it already
    holds, so the worker can be handed a message of a partition it just gave up. ``_dispatch``
    used to stamp it with the partition's *new* generation (bumped by the hand-over): it looked
    current, a lane delivered it after the hand-over, and its offset was tracked (and could be
    committed) for a partition the worker no longer owned. Real messages from Kafka; the
    worker's own rebalance callbacks, called in the order the client calls them."""
    from confluent_kafka import TopicPartition

    from pipeline.config.loader import load_config
    from pipeline.sink.worker import SinkWorker

    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic, partitions=2)
    prod = EventProducer(stack, topic, topic_prefix)
    for part in (0, 1):
        send(prod, part, part, 1)
    prod.flush()
    messages = {m.partition(): m for m in read_topic(stack, topic, 2)}
    assert set(messages) == {0, 1}
    with target() as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                           route_yaml(f"{srv.url}/items/{{$key.id}}", topic,
                                      f"{topic_prefix}-fetched", 0.05))
        worker = SinkWorker(load_config(cfg), "reb")
        consumer = worker._open()  # lanes not started: what is dispatched stays in the inboxes
        worker.writer.start()
        try:
            worker._on_assign(consumer, [TopicPartition(topic, 0), TopicPartition(topic, 1)])
            worker._on_revoke(consumer, [TopicPartition(topic, 1)])
            worker._dispatch(messages[1])  # fetched before the revoke
            worker._dispatch(messages[0])  # still owned: taken
            queued = [lane.inbox.get_nowait() for lane in worker.lanes
                      for _ in range(lane.inbox.qsize())]
            assert [(w.topic, w.partition) for w in queued] == [(topic, 0)]
            assert worker.ownership.current(queued[0])
            assert worker.tracker.unfinished() == {(topic, 0): 1}
            assert [tp.partition for tp in worker.tracker.committable()] == [0]
            # the same partition assigned again later: the stale copy stays stale
            worker._on_assign(consumer, [TopicPartition(topic, 1)])
            worker._dispatch(messages[1])
            fresh = [lane.inbox.get_nowait() for lane in worker.lanes
                     for _ in range(lane.inbox.qsize())]
            assert [(w.partition, worker.ownership.current(w)) for w in fresh] == [(1, True)]
            worker._on_revoke(consumer, [TopicPartition(topic, 1)])
            assert not worker.ownership.current(fresh[0])  # a lane abandons it
        finally:
            consumer.close()
            for lane in worker.lanes:
                lane.close()
            worker.writer.close()
            worker.dead_letters.close()
            worker.connector.close()
    assert srv.received() == []
