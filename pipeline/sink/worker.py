"""``dx sink run ROUTE``: a consumer-group worker that delivers one route's events.

Who does what (one file each)::

    worker.py     consume ─► decode key ─► lane = crc32(key) % concurrency ─► lane inbox
                  rebalances, offset commits, partition pauses, redrive polls, purge, lag
    lane.py       per key, in order: park | decode | filter | map | deliver | retry | dead
                  (a key backing off holds back only its own later events)
    ownership.py  partition generations and the hand-over on revoke
    offsets.py    the oldest unfinished offset per partition: what may be committed
    recorder.py   task rows; an offset is finished once its task row is durable
    breaker.py    the route's circuit breaker (target down: pause, probe, resume)
    deadletter.py the dead-letter producer
    housekeeping.py  redrive polls, retention purge, breaker state in dx.route_health

Guarantees:

* **Offsets** are committed only up to the oldest offset whose task is not yet durable in the
  task store (``enable.auto.commit`` and ``enable.auto.offset.store`` are off). A crash redelivers
  everything after that: at-least-once, with ``event_id`` as the idempotency key.
* **Per-key order**: a key always lands in the same lane, which keeps its events in order; a
  later event is never sent before an earlier one succeeded, was skipped or went dead.
* **Memory**: the events of a partition held unfinished (queued, backing off, or behind an
  earlier event of their key) are bounded by ``max_unfinished``; at the bound the worker pauses
  that partition (other partitions go on) and resumes it at half.
* **Target down**: the route's breaker opens; lanes stop attempting, one probe at a growing
  interval; ``dx status`` shows "target down since ..." (``dx.route_health``).
* **Rebalances** (see ownership.py): the old owner never delivers or records an event of a
  partition after the hand-over.
* **SIGTERM** sets a stop flag: polling stops, lanes abandon backoffs (attempted tasks become
  ``failed``, not acknowledged), in-flight requests finish, durable outcomes are committed.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from connectors import registry
from connectors.base import Connector, key_text
from pipeline.config.model import DxConfig
from pipeline.db import connect
from pipeline.errors import ConfigError, DxError, ServiceUnavailable, TerminalError, TransientError
from pipeline.events.topics import existing_topics
from pipeline.events.wire import registry_client
from pipeline.observability.kafka_outage import outage_reporter
from pipeline.observability.lag import report_lag
from pipeline.observability.logging import KAFKA_LOG
from pipeline.observability.metrics import METRICS, WorkerMetrics
from pipeline.observability.server import WorkerServer
from pipeline.routes.pause import RoutePause
from pipeline.sink.breaker import Breaker
from pipeline.sink.deadletter import DeadLetters
from pipeline.sink.decode import Decoder, Undecodable
from pipeline.sink.housekeeping import Housekeeper
from pipeline.sink.keyhold import KeyHold
from pipeline.sink.lane import STOP, Lane
from pipeline.sink.mapping import RouteLogic
from pipeline.sink.offsets import OffsetTracker
from pipeline.sink.ownership import Ownership
from pipeline.sink.recorder import Recorder, SinkStats
from pipeline.sink.work import KeyId, Work, message_headers
from pipeline.tasks import health
from pipeline.tasks.store import TaskStore, ensure_schema
from pipeline.tasks.writer import TaskWriter

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005

__all__ = ["SinkStats", "SinkWorker"]


class SinkWorker:
    """One route's worker. ``run()`` blocks until ``stop`` is set (SIGTERM) or a fatal error."""

    def __init__(self, config: DxConfig, route_name: str, *, keep_overheads: bool = False,
                 commit_interval_s: float = 0.5, redrive_poll_s: float = 1.0,
                 stop_when_idle_s: float | None = None, purge_interval_s: float = 3600,
                 server: WorkerServer | None = None, lag_interval_s: float = 2.0,
                 paused: Callable[[], bool] | None = None) -> None:
        """``paused``: polled every loop (cache it): while it says True the worker consumes
        nothing (its partitions stay assigned and keep their place; work already taken
        finishes) — an operator's route pause. By default the route's row in dx.route_state
        (``dx sink pause|resume``, the console)."""
        self.config = config
        if paused is None:
            paused = RoutePause(config.database.url.get_secret_value(), "sink", route_name).paused
        self.operator_paused = paused
        self._held_by_operator = False
        self.server = server if server is not None else WorkerServer(0)
        self.lag_interval_s = lag_interval_s
        self.index, self.route = config.sink(route_name)
        self.db_url = config.database.url.get_secret_value()
        self.stop = threading.Event()
        self.tracker = OffsetTracker()
        self.ownership = Ownership()
        self.breaker = Breaker(self.route.name, self.route.breaker,
                               max_attempts=self.route.retry.max_attempts)
        self.logic = RouteLogic(self.route)
        self.metrics: WorkerMetrics = METRICS.worker("sink", self.route.name)
        self.keep_overheads = keep_overheads
        self.overheads: list[float] = []
        self.commit_interval_s = commit_interval_s
        self.redrive_poll_s = redrive_poll_s
        self.stop_when_idle_s = stop_when_idle_s
        self.purge_interval_s = purge_interval_s
        self.connector: Connector[Any]
        self.writer: TaskWriter
        self.recorder: Recorder
        self.decoder: Decoder
        self.dead_letters: DeadLetters
        self.lanes: list[Lane] = []
        self.batch_size = self.route.batch_size
        self.assigned = threading.Event()
        self.paused: set[tuple[str, int]] = set()  # partitions paused at the memory bound
        #: assigned partitions held paused until the parked keys could be read (database down
        #: at the assignment: their events must not pass a dead task of their key)
        self.parked_unknown: set[tuple[str, int]] = set()
        self._next_parked_try = 0.0
        self.held = KeyHold(self.route.name)
        self.housekeeper: Housekeeper

    @property
    def stats(self) -> SinkStats:
        return self.recorder.stats if hasattr(self, "recorder") else SinkStats()

    def overhead(self, seconds: float) -> None:
        if self.keep_overheads:
            self.overheads.append(seconds)

    def decode_key(self, raw: bytes | None) -> dict[str, Any]:
        """The key's fields (an undecodable key: its bytes, the value decides whether the
        event is poison); a registry that cannot be reached raises ServiceUnavailable."""
        try:
            return self.decoder.key(raw)
        except Undecodable:
            return {"raw": raw.hex() if raw else None}

    @property
    def partitions(self) -> set[tuple[str, int]]:
        return set(self.ownership.owned())

    def owned(self) -> list[tuple[str, int]]:
        """The (topic, partition) pairs this worker currently owns (a snapshot, any thread)."""
        return self.ownership.owned()

    # -- set-up ----------------------------------------------------------------------------------

    def _open(self) -> Consumer:
        with contextlib.closing(connect(self.db_url, autocommit=True)) as conn:
            ensure_schema(conn)
            health.ensure_schema(conn)
        self.writer = TaskWriter(self.db_url)
        self.recorder = Recorder(self.route, self.writer, self.tracker, self.ownership,
                                 self.metrics)
        sr = self.config.schema_registry
        self.decoder = Decoder(registry_client(sr), sr.url)
        self.connector = registry.create(self.route.connector, route=self.route.name)
        self.batch_size = max(1, min(self.route.batch_size, self.connector.max_batch))
        self.connector.log_successes = self.route.log.detail == "full"
        try:
            self.connector.open()
        except ConfigError:
            raise
        except DxError as err:
            file, line = self.config.where("sinks", self.index, "connector")
            cls = TransientError if err.transient else TerminalError
            raise cls(f"route {self.route.name} ({file}:{line}): target check failed: "
                      f"{err}") from None
        kafka = self.config.kafka
        self.dead_letters = DeadLetters(kafka, self.route, self.stop)
        consumer = Consumer(kafka.librdkafka({
            "group.id": self.route.consumer_group, "enable.auto.commit": False,
            "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "client.id": f"dx-sink-{self.route.name}", "on_commit": self._committed,
            "error_cb": outage_reporter(kafka.bootstrap_servers),
        }), logger=KAFKA_LOG)
        try:
            present = existing_topics(AdminClient(kafka.librdkafka(), logger=KAFKA_LOG), 10.0,
                                      where=kafka.bootstrap_servers)
        except ServiceUnavailable:
            consumer.close()
            raise
        missing = [t for t in self.route.topics if t not in present]
        if missing:
            log.warning("route %s: topics not there yet (waiting for them): %s",
                        self.route.name, ", ".join(missing))
        self.lanes = [Lane(i, route=self.route, logic=self.logic, decoder=self.decoder,
                           connector=self.connector, ownership=self.ownership,
                           recorder=self.recorder, writer=self.writer,
                           dead_letters=self.dead_letters, breaker=self.breaker,
                           metrics=self.metrics, stop=self.stop, db_url=self.db_url,
                           batch_size=self.batch_size, decode_key=self.decode_key,
                           overhead=self.overhead)
                      for i in range(self.route.concurrency)]
        self._load_parked()
        self.housekeeper = Housekeeper(
            self.route, self.db_url, self.breaker, self.stop, owned=self.ownership.owned,
            parked=lambda: [k for lane in self.lanes for k in list(lane.blocked)],
            redrive=lambda k: self.lane_for(k[1]).request_redrive(k),
            redrive_poll_s=self.redrive_poll_s, purge_interval_s=self.purge_interval_s)
        return consumer

    def _load_parked(self) -> None:
        """Keys parked by an earlier run or the partitions' previous owner (it flushed its
        tasks before letting go)."""
        with contextlib.closing(connect(self.db_url)) as conn:
            blocked = TaskStore(conn).blocked_keys(self.route.name)
        by_lane: dict[int, set[KeyId]] = {}
        for k in blocked:
            by_lane.setdefault(self._lane_index(k[1]), set()).add(k)
        for i, keys in by_lane.items():
            self.lanes[i].park(keys)

    def _lane_index(self, key: str) -> int:
        return zlib.crc32(key.encode()) % len(self.lanes)

    def lane_for(self, key: str) -> Lane:
        return self.lanes[self._lane_index(key)]

    # -- run -------------------------------------------------------------------------------------

    def run(self) -> SinkStats:
        # a lane woken by new work waits for the GIL at most this long (default 5 ms): the
        # consume -> send overhead of a task, at its tail, is mostly this wait
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        consumer = self._open()
        # what is loaded by now (modules, clients, schemas) lives as long as the worker: out
        # of the cyclic collector's sight, a full collection no longer walks it while holding
        # the GIL (measured: a 264 ms pause at the tail of the consume -> send overhead)
        gc.collect()
        gc.freeze()
        self.writer.start()
        for lane in self.lanes:
            lane.start()
        try:
            self._loop(consumer)
        finally:
            self._shutdown(consumer)
            gc.unfreeze()
        for lane in self.lanes:
            if lane.error is not None:
                raise lane.error
        return self.stats

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self.ownership.assign((p.topic, p.partition) for p in parts)
        hold = self._held_by_operator  # a partition that arrives while the route is paused
        if parts:
            try:
                self._load_parked()
            except (DxError, psycopg.Error) as err:
                # without the parked keys a later event of a dead key would be delivered past
                # it: the new partitions wait (paused) until the task store answers
                log.warning("route %s: cannot read the parked keys (%s); %s wait until it can",
                            self.route.name, err,
                            ", ".join(f"{p.topic}[{p.partition}]" for p in parts))
                self.parked_unknown.update((p.topic, p.partition) for p in parts)
                self._next_parked_try = time.monotonic() + 1.0
                hold = True
        if hold and parts:
            # a partition can only be paused once assigned: assign here (the client then does
            # not), so it never fetches before the pause
            consumer.incremental_assign(parts)
            consumer.pause(parts)
        self._readiness()
        self.assigned.set()

    def _retry_parked(self, consumer: Consumer) -> None:
        """Partitions waiting for the parked keys: read them again, resume when they came."""
        if not self.parked_unknown or time.monotonic() < self._next_parked_try:
            return
        try:
            self._load_parked()
        except (DxError, psycopg.Error) as err:
            log.warning("route %s: still cannot read the parked keys: %s", self.route.name, err)
            self._next_parked_try = time.monotonic() + 1.0
            return
        go = [] if self._held_by_operator else [
            tp for tp in self.parked_unknown if self._may_flow(tp, parked_known=True)]
        with contextlib.suppress(KafkaException):
            consumer.resume([TopicPartition(t, p) for t, p in go])
        log.warning("route %s: parked keys read; %s resumed", self.route.name,
                    ", ".join(f"{t}[{p}]" for t, p in sorted(self.parked_unknown)))
        self.parked_unknown.clear()

    def _may_flow(self, tp: tuple[str, int], *, parked_known: bool = False) -> bool:
        """Whether nothing else holds ``tp`` paused (memory bound, parked keys unknown)."""
        return tp not in self.paused and (parked_known or tp not in self.parked_unknown)

    def _readiness(self) -> None:
        self.server.set_assignment(len(self.ownership.owned()), stopping=self.stop.is_set())

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        """Let calls under way for the revoked partitions return (bounded by the connector's
        whole-request timeout: lanes send one request per call where they can), record and
        commit what is durable, then let go: work still queued or backing off for them is
        abandoned (the new owner redelivers it)."""
        tps = {(p.topic, p.partition) for p in parts}
        timeout = float(getattr(self.connector.settings, "timeout_s", None) or 10.0) + 2.0
        self.ownership.hand_over(tps, timeout)
        with contextlib.suppress(Exception):
            self.writer.flush(10)
        self._commit(consumer)
        for t, p in tps:
            self.tracker.forget(t, p)
            self.metrics.forget_partition(t, p)
        self.paused -= tps
        self.parked_unknown -= tps
        self.held.drop(tps)
        self._readiness()

    def _consume(self, consumer: Consumer) -> list[Message]:
        """What is there now, without a fixed wait when events flow: take the batch at hand;
        when there is none, wait for the first message (at most 0.1 s) and take what came
        with it."""
        msgs = consumer.consume(num_messages=500, timeout=0)
        if msgs:
            return msgs
        first = consumer.poll(0.1)
        if first is None:
            return []
        return [first, *consumer.consume(num_messages=499, timeout=0)]

    def _loop(self, consumer: Consumer) -> None:
        consumer.subscribe(list(self.route.topics), on_assign=self._on_assign,
                           on_revoke=self._on_revoke, on_lost=self._on_revoke)
        self.server.set_ready(False, "waiting for a partition assignment")
        next_commit = time.monotonic() + self.commit_interval_s
        next_lag = last_busy = time.monotonic()
        self.housekeeper.start()
        while not self.stop.is_set():
            self.server.heartbeat()
            self._operator_pause(consumer)
            msgs = self._take(consumer)
            for i, msg in enumerate(msgs):
                if not self._dispatch(msg):
                    self._hold(consumer, msgs[i:])
                    break
            else:
                if msgs and self.held.cleared():
                    self._resume_after_hold(consumer)
            inflight = self.tracker.outstanding()
            if msgs or inflight or self.held:
                last_busy = time.monotonic()
            elif (self.stop_when_idle_s is not None and self.assigned.is_set()
                  and time.monotonic() - last_busy > self.stop_when_idle_s):
                log.info("route %s idle for %.1fs; stopping", self.route.name,
                         self.stop_when_idle_s)
                break
            self._bound_memory(consumer)
            self._retry_parked(consumer)
            now = time.monotonic()
            if now >= next_commit:
                self._commit(consumer, wait=False)
                next_commit = now + self.commit_interval_s
            if now >= next_lag:
                self._report_lag(consumer)
                next_lag = now + self.lag_interval_s
            if self.writer.fatal is not None:
                raise self.writer.failure()
            if self.writer.error is not None:
                log.warning("task store unavailable: %s", self.writer.error)

    def _bound_memory(self, consumer: Consumer) -> None:
        """Pause a partition whose unfinished events reach ``max_unfinished``; resume at half."""
        limit = self.route.max_unfinished
        counts = self.tracker.unfinished()
        full = [tp for tp, n in counts.items() if n >= limit and tp not in self.paused]
        calm = [tp for tp in self.paused if counts.get(tp, 0) <= limit // 2
                and not self._held_by_operator and tp not in self.parked_unknown]
        if full:
            log.warning("route %s: %s holds %d unfinished events; pausing it until half are "
                        "done", self.route.name, ", ".join(f"{t}[{p}]" for t, p in full), limit)
            with contextlib.suppress(KafkaException):
                consumer.pause([TopicPartition(t, p) for t, p in full])
                self.paused.update(full)
        if calm:
            with contextlib.suppress(KafkaException):
                consumer.resume([TopicPartition(t, p) for t, p in calm])
                self.paused.difference_update(calm)

    def _operator_pause(self, consumer: Consumer) -> None:
        """Pause or resume the whole assignment when the operator's pause changes (partitions
        paused at the memory bound stay paused)."""
        if self.operator_paused is None:
            return
        want = self.operator_paused()
        if want == self._held_by_operator:
            return
        tps = [TopicPartition(t, p) for t, p in self.ownership.owned()
               if want or self._may_flow((t, p))]
        try:
            if want:
                consumer.pause(tps)
            else:
                consumer.resume(tps)
        except KafkaException as err:
            log.warning("route %s: could not %s: %s", self.route.name,
                        "pause" if want else "resume", err)
            return
        self._held_by_operator = want
        log.warning("route %s %s by the operator", self.route.name,
                    "paused" if want else "resumed")

    def _take(self, consumer: Consumer) -> list[Message]:
        """The next messages: those held for the registry once their retry is due, else what
        Kafka has. While messages are held the assignment stays paused, and whatever a resumed
        partition still brings queues behind them, in order."""
        if self.held and not self.held.messages and self.held.cleared():
            self._resume_after_hold(consumer)  # a revoke took every held message
        if not self.held:
            return self._consume(consumer)
        self.held.extend(self._consume(consumer))
        self._pause_all(consumer)
        return self.held.due()

    def _hold(self, consumer: Consumer, msgs: list[Message]) -> None:
        """The registry did not answer for the first of ``msgs``' keys: keep them (nothing is
        tracked, so no offset passes them), pause consumption and try again later; the loop,
        its heartbeat and the consumer's group membership go on meanwhile."""
        self.held.hold(msgs)
        self._pause_all(consumer)

    def _pause_all(self, consumer: Consumer) -> None:
        with contextlib.suppress(KafkaException):
            consumer.pause(consumer.assignment())

    def _resume_after_hold(self, consumer: Consumer) -> None:
        """The held messages went through: resume what nothing else holds paused."""
        if self._held_by_operator:
            return
        with contextlib.suppress(KafkaException):
            consumer.resume([TopicPartition(t, p) for t, p in self.ownership.owned()
                             if self._may_flow((t, p))])

    def _dispatch(self, msg: Message) -> bool:
        """Hand one message to its key's lane; False (nothing taken) when the registry could
        not be reached to decode its key."""
        err = msg.error()
        if err is not None:
            if err.code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                return True
            if err.fatal():
                raise ServiceUnavailable("kafka", self.config.kafka.bootstrap_servers, err.str())
            log.warning("kafka: %s", err.str())
            return True
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        assert topic is not None and partition is not None and offset is not None
        generation = self.ownership.admit((topic, partition))
        if generation is None:
            # fetched before a revoke, handed over after it: the partition's owner reads it
            # (tracking it would commit an offset of a partition this worker does not own)
            log.debug("route %s: %s[%d]@%d not owned any more; left to its owner",
                      self.route.name, topic, partition, offset)
            return True
        value = msg.value()
        raw_key = msg.key()
        key: dict[str, Any] = {}
        if value is not None:
            try:
                key = self.decode_key(raw_key)
            except ServiceUnavailable as unavailable:
                self.held.failed(unavailable, f"{topic}[{partition}]@{offset}")
                return False
        self.tracker.add(topic, partition, offset)
        self.metrics.received(topic)
        if value is None:  # a tombstone: compaction's business, not a change to deliver
            self.tracker.done(topic, partition, offset)
            return True
        ktext = key_text(key)
        work = Work(topic=topic, partition=partition, offset=offset, raw_key=raw_key,
                    raw_value=value, headers=message_headers(msg), key=key, key_text=ktext,
                    generation=generation,
                    consumed_at=time.monotonic())
        self.lane_for(ktext).inbox.put(work)
        return True

    def _commit(self, consumer: Consumer, *, wait: bool = True) -> None:
        """Commit what is finished; in the loop without waiting for the broker (a failed
        asynchronous commit is forgotten by ``_committed`` and retried next time)."""
        tps = self.tracker.committable()
        if not tps:
            return
        try:
            if wait:
                consumer.commit(offsets=tps, asynchronous=False)
            else:
                consumer.commit(offsets=tps, asynchronous=True)
            self.tracker.mark_committed(tps)
        except KafkaException as err:
            log.warning("offset commit failed (will retry): %s", err)

    def _committed(self, err: KafkaError | None, tps: list[TopicPartition]) -> None:
        if err is not None:
            log.warning("offset commit failed (will retry): %s", err)
            self.tracker.unmark_committed(tps)

    def _report_lag(self, consumer: Consumer) -> None:
        """``dx_consumer_lag_messages`` against the offsets this worker committed."""
        report_lag(consumer, self.metrics, [(t, p, self.tracker.committed_offset(t, p))
                                            for t, p in self.ownership.owned()])

    def _shutdown(self, consumer: Consumer) -> None:
        self.stop.set()
        self._readiness()
        for lane in self.lanes:
            lane.inbox.put(STOP)
        deadline = time.monotonic() + 30.0
        for lane in self.lanes:
            lane.join(max(0.1, deadline - time.monotonic()))
        if self.housekeeper.is_alive():
            self.housekeeper.join(10)
        try:
            self.writer.flush(30)
            self._commit(consumer)
        except DxError as err:
            log.warning("could not record the last outcomes: %s", err)
        finally:
            consumer.close()
            for lane in self.lanes:
                lane.close()
            self.writer.close()
            self.dead_letters.close()
            self.connector.close()
