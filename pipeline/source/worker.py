"""``dx source run ROUTE``: consume an inbound topic and apply it exactly once.

The contract, in the order things happen for each batch:

1. Collect up to ``batch_size`` messages or wait ``batch_timeout_ms``. Nothing is auto-committed.
2. Decode and validate every message outside any transaction (a bad one becomes a failure).
3. In ONE PostgreSQL transaction: set ``dx.origin`` (transaction-local, so capture tags the
   changes and sinks never send them back to this system), lock and check this route's rows in
   ``dx.source_offsets`` (compare-and-set against the positions we started from), apply the
   good events, record failed/skipped events as tasks, produce dead letters (flushed *before*
   the commit: a dead letter may be repeated after a crash, never lost), store the new offsets,
   commit.
4. Only then, optionally, commit the same offsets to Kafka so lag tools see progress.

On start and on every partition assignment the worker reads ``dx.source_offsets`` and starts each
partition there (``on_assign``), so a crash at any point replays exactly the uncommitted batch.
SIGTERM/SIGINT: stop collecting, apply (or abandon, if the database fails) the batch in hand,
close. A second signal aborts at once; the open transaction is rolled back by PostgreSQL, so a
batch is never half-applied.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from pipeline import db
from pipeline.capture.origin import mark_origin
from pipeline.config.model import DxConfig
from pipeline.errors import ServiceUnavailable, TerminalError, TransientError
from pipeline.events.deadletter import dead_letter_headers
from pipeline.events.topics import ensure_route_topics, topic_id
from pipeline.events.wire import registry_client
from pipeline.observability import tracing
from pipeline.observability.kafka_outage import outage_reporter
from pipeline.observability.lag import report_lag
from pipeline.observability.logging import KAFKA_LOG
from pipeline.observability.metrics import METRICS
from pipeline.observability.server import WorkerServer
from pipeline.routes.pause import RoutePause
from pipeline.row_errors import log_text
from pipeline.source import offsets, tasks
from pipeline.source.apply import Applier
from pipeline.source.catalog import Target, read_target
from pipeline.source.decode import AvroDecoder
from pipeline.source.events import Event, Failure, RawMessage, offset_of, partition_of, to_raw
from pipeline.source.inbound import Converter
from pipeline.tasks.headers import decode_headers
from pipeline.tasks.store import TaskStore

log = logging.getLogger(__name__)


class CatalogDrift(TransientError):
    """The target table no longer has what the worker read at start; re-read it."""


class TopicReset(TransientError):
    """Kafka moved a partition's position below what is applied; check the topic again."""


@dataclass
class Stats:
    batches: int = 0
    applied: int = 0
    failed: int = 0
    skipped: int = 0

    def add(self, n_events: int, failures: list[Failure]) -> None:
        self.batches += 1
        dead = sum(1 for f in failures if f.status == "dead")
        self.failed += dead
        self.skipped += len(failures) - dead
        self.applied += n_events - len(failures)


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """dx's tables for inbound routes (``dx init`` calls this)."""
    offsets.ensure_schema(conn)
    tasks.ensure_schema(conn)


class SourceWorker:
    """Runs one inbound route until stopped (or, for tests and benchmarks, until idle)."""

    def __init__(self, config: DxConfig, route_name: str, *,
                 stop_when_idle_s: float | None = None,
                 on_batch: Callable[[int, list[Failure]], None] | None = None,
                 server: WorkerServer | None = None, lag_interval_s: float = 2.0,
                 accept_retention_gap: bool = False, accept_topic_reset: bool = False) -> None:
        self.config = config
        self.index, self.route = config.source(route_name)
        self.server = server if server is not None else WorkerServer(0)
        self.metrics = METRICS.worker("source", self.route.name)
        self.lag_interval_s = lag_interval_s
        self.accept_retention_gap = accept_retention_gap
        self.accept_topic_reset = accept_topic_reset
        self.topic_id: str | None = None  # the inbound topic's id in the cluster, when known
        self.assigned: set[int] = set()  # partitions of the current assignment
        self.stop_when_idle_s = stop_when_idle_s
        self.on_batch = on_batch
        self.stats = Stats()
        self.stopping = False
        self.recorder = tasks.recorder()
        # Per-partition state, owned by the rebalance callbacks:
        self.expected: dict[int, int | None] = {}  # stored next_offset (None: no row yet)
        self.position: dict[int, int] = {}  # next offset the batch accepts (dedupe on replay)
        self.batch: list[Message] = []
        self.pause = RoutePause(config.database.url.get_secret_value(), "source",
                                self.route.name)
        self.held: list[tuple[str, int]] = []  # partitions paused by an operator's pause

    # ---- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop after the current batch (``dx source run`` calls this on SIGTERM/SIGINT)."""
        log.warning("route %s: stopping after the current batch", self.route.name)
        self.stopping = True
        self.server.set_ready(False, "stopping")

    def run(self) -> Stats:
        """Consume and apply until stopped (:meth:`stop`, or ``stopping`` set by the owner);
        transient failures reconnect with backoff."""
        backoff = 0.5
        while not self.stopping:
            try:
                if self._run_connected():
                    break
                backoff = 0.5
            except TransientError as err:
                if self.stop_when_idle_s is not None and \
                        not isinstance(err, offsets.Fenced | CatalogDrift | TopicReset):
                    raise
                self.metrics.failed("transient")
                self.metrics.retried()
                self.server.set_ready(False, f"reconnecting: {err}")
                log.warning("route %s: %s; retrying in %.1fs", self.route.name, err, backoff)
                self.server.heartbeat()
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        return self.stats

    def _run_connected(self) -> bool:
        """One connected session; returns True when done (idle or stopped)."""
        url = self.config.database.url.get_secret_value()
        conn = db.connect(url, application_name=f"dx-source-{self.route.name}",
                          connect_timeout_s=self.config.database.connect_timeout_s)
        consumer: Consumer | None = None
        producer: Producer | None = None
        self.assigned.clear()
        self.held = []
        try:
            admin = AdminClient(self.config.kafka.librdkafka(), logger=KAFKA_LOG)
            ensure_route_topics(self.config.kafka, self.route, admin)
            self.topic_id = topic_id(admin, self.route.topic)
            ensure_schema(conn)
            target = read_target(conn, self.config, self.index)
            conn.commit()
            applier = Applier(conn, self.route, target)
            convert = Converter(self.route, target, self._decoder())
            producer = Producer(self.config.kafka.librdkafka(
                {"enable.idempotence": True, "linger.ms": 5}), logger=KAFKA_LOG)
            consumer = self._consumer(conn)
            return self._loop(conn, consumer, producer, applier, convert, target)
        except psycopg.OperationalError as err:
            raise db.unreachable(url, err) from None
        except psycopg.Error as err:  # not one row's fault (those fail alone): the batch's
            what = f"PostgreSQL refused the batch ({log_text(err)}: {err.diag.message_primary})"
            if (err.sqlstate or "").startswith("40"):  # deadlock, serialization: retry it
                raise TransientError(f"route {self.route.name}: {what}; retrying") from None
            raise TerminalError(f"route {self.route.name}: {what}") from None
        except KafkaException as err:
            raise ServiceUnavailable("kafka", self.config.kafka.bootstrap_servers,
                                     str(err)) from None
        finally:
            self.batch = []
            if consumer is not None:
                consumer.close()
            if producer is not None:
                producer.flush(5)
            conn.close()

    def _decoder(self) -> Callable[[bytes], Any] | None:
        if self.route.format != "avro":
            return None
        reg = self.config.schema_registry
        return AvroDecoder(registry_client(reg), reg.url)

    # ---- Kafka ------------------------------------------------------------------------------

    def _consumer(self, conn: psycopg.Connection[Any]) -> Consumer:
        route = self.route
        conf = self.config.kafka.librdkafka({
            "group.id": route.group,
            "client.id": f"dx-source-{route.name}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": route.start,
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "range",
            "error_cb": outage_reporter(self.config.kafka.bootstrap_servers),
        })
        consumer = Consumer(conf, logger=KAFKA_LOG)

        def on_assign(c: Consumer, parts: list[TopicPartition]) -> None:
            numbers = [p.partition for p in parts]
            stored = offsets.load(conn, route.name, route.topic, numbers)
            ids = offsets.topic_ids(conn, route.name, route.topic, numbers)
            conn.rollback()
            resume = offsets.check_stored(
                c, self.route.name, self.route.topic, stored, ids, self.topic_id,
                accept_topic_reset=self.accept_topic_reset,
                accept_retention_gap=self.accept_retention_gap)
            start = OFFSET_BEGINNING if route.start == "earliest" else OFFSET_END
            for p in parts:
                s = stored.get(p.partition)
                at = resume.get(p.partition, s)
                p.offset = at if at is not None else start
                self.expected[p.partition] = s  # the row's value: the batch compares-and-sets it
                self.position[p.partition] = at if at is not None else -1
            log.info("route %s: assigned %s", route.name,
                     {p.partition: stored.get(p.partition) for p in parts})
            c.assign(parts)
            self.assigned.update(p.partition for p in parts)
            self._readiness()

        def on_revoke(c: Consumer, parts: list[TopicPartition]) -> None:
            gone = {p.partition for p in parts}
            self.batch = [m for m in self.batch if m.partition() not in gone]
            for p in gone:
                self.expected.pop(p, None)
                self.position.pop(p, None)
                self.metrics.forget_partition(route.topic, p)
            self.assigned -= gone
            self._readiness()
            log.info("route %s: revoked %s", route.name, sorted(gone))

        consumer.subscribe([route.topic], on_assign=on_assign, on_revoke=on_revoke,
                           on_lost=on_revoke)
        self.server.set_ready(False, "waiting for a partition assignment")
        return consumer

    def _collect(self, consumer: Consumer) -> None:
        """Fill ``self.batch`` up to batch_size or until the batch timeout."""
        size = self.route.batch_size
        deadline = time.monotonic() + self.route.batch_timeout_ms / 1000
        while len(self.batch) < size and not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for msg in consumer.consume(num_messages=size - len(self.batch), timeout=left):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    if err.fatal():
                        raise ServiceUnavailable("kafka", self.config.kafka.bootstrap_servers,
                                                 err.str())
                    log.warning("route %s: kafka: %s", self.route.name, err.str())
                    continue
                p, o = partition_of(msg), offset_of(msg)
                pos = self.position.get(p)
                if pos is None:
                    continue  # not ours any more
                if o < pos:
                    applied = self.expected.get(p)
                    if applied is not None and o < applied:
                        # Below what is applied: Kafka reset the position (the topic was
                        # re-created under the worker). Dropping these as replays would lose
                        # them; reconnect and let the assignment checks decide.
                        raise TopicReset(f"{self.route.topic}[{p}] went back to offset {o}, "
                                         f"below the stored offset {applied}; "
                                         "checking the topic again")
                    continue  # a replay of what the batch already holds
                self.position[p] = o + 1
                self.batch.append(msg)

    def _loop(self, conn: psycopg.Connection[Any], consumer: Consumer, producer: Producer,
              applier: Applier, convert: Converter, target: Target) -> bool:
        idle_since = time.monotonic()
        next_redrive = 0.0
        next_lag = 0.0
        while True:
            self.server.heartbeat()
            paused = self._hold(consumer)
            self._collect(consumer)
            if self.batch:
                batch, self.batch = self.batch, []
                self._apply(conn, consumer, producer, applier, convert, batch)
                idle_since = time.monotonic()
            if time.monotonic() >= next_lag:
                self._report_lag(consumer)
                next_lag = time.monotonic() + self.lag_interval_s
            if time.monotonic() >= next_redrive and not paused:
                if self._redrive(conn, producer, applier, convert):
                    idle_since = time.monotonic()
                next_redrive = time.monotonic() + 1.0
            elif self.stop_when_idle_s is not None and \
                    time.monotonic() - idle_since >= self.stop_when_idle_s and self.expected:
                return True
            if self.stopping:
                return True

    def _hold(self, consumer: Consumer) -> bool:
        """Follow the operator's pause (``dx source pause``): pause fetching of the whole
        assignment (again after a rebalance), resume it when resumed. Polling goes on, so the
        group keeps this member and its partitions; nothing fetched is skipped, because fetching
        restarts from the consumed position."""
        paused = self.pause.paused()
        parts = consumer.assignment() if paused or self.held else []
        now = sorted((p.topic, p.partition) for p in parts)
        if paused and now != self.held:
            consumer.pause(parts)
            self.held = now
        elif not paused and self.held:
            consumer.resume(parts)
            self.held = []
        return paused

    def _readiness(self) -> None:
        self.server.set_assignment(len(self.assigned), stopping=self.stopping)

    def _report_lag(self, consumer: Consumer) -> None:
        """``dx_consumer_lag_messages`` against the offsets stored in dx.source_offsets."""
        report_lag(consumer, self.metrics, [(self.route.topic, p, self.expected.get(p))
                                            for p in sorted(self.assigned)])

    # ---- apply ------------------------------------------------------------------------------

    def _apply(self, conn: psycopg.Connection[Any], consumer: Consumer, producer: Producer,
               applier: Applier, convert: Converter, batch: list[Message]) -> None:
        route = self.route
        started = time.perf_counter()
        self.metrics.received(route.topic, len(batch))
        events: list[Event] = []
        failures: list[Failure] = []
        next_offsets: dict[int, int] = {}
        for msg in batch:
            raw = to_raw(msg)
            next_offsets[raw.partition] = raw.offset + 1
            out = convert(raw)
            if isinstance(out, Event):
                events.append(out)
            else:
                failures.append(out)
        expected = {p: self.expected.get(p) for p in next_offsets}
        try:
            with self._catalog_guard(), conn.transaction():
                mark_origin(conn, route.system)
                offsets.lock_and_check(conn, route.name, route.topic, expected)
                failures.extend(applier.apply(events))
                failures.sort(key=lambda f: (f.message.partition, f.message.offset))
                self.recorder.record(conn, route.name, failures)
                offsets.store(conn, route.name, route.topic, next_offsets, expected,
                              self.topic_id)
                self._dead_letter(producer, failures)
        except psycopg.errors.UniqueViolation as err:
            raise offsets.Fenced(f"route {route.name}: another worker stored offsets first "
                                 f"({err.diag.message_primary})") from None
        conn.commit()
        for p, nxt in next_offsets.items():
            if p in self.expected:
                self.expected[p] = nxt
        self.stats.add(len(batch), failures)
        self._count(batch, failures, time.perf_counter() - started)
        for f in failures:
            with tracing.attached(f.message.headers):  # the log line carries the trace id
                log.log(logging.ERROR if f.status == "dead" else logging.INFO,
                        "route %s: %s %s", route.name, f.status, f.describe())
        if self.on_batch is not None:
            self.on_batch(len(batch), failures)
        if route.commit_to_kafka:
            try:
                consumer.commit(offsets=[TopicPartition(route.topic, p, o)
                                         for p, o in next_offsets.items()], asynchronous=True)
            except KafkaException as err:  # lag visibility only; the truth is in PostgreSQL
                log.debug("route %s: kafka commit: %s", route.name, err)

    @contextlib.contextmanager
    def _catalog_guard(self) -> Iterator[None]:
        """The target table changed under the worker (a column or the table dropped or renamed:
        catalog drift). The batch's transaction is rolled back; the worker reconnects and reads
        the table again, which either adapts (a route writing every column) or stops with the
        dx.yaml line of a configured column that is gone."""
        try:
            yield
        except (psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedTable) as err:
            raise CatalogDrift(f"table {self.route.qualified} changed under the worker "
                               f"({err.diag.message_primary}); reading it again") from None

    def _count(self, batch: list[Message], failures: list[Failure], seconds: float) -> None:
        """Metrics of a committed batch: applied, skipped, dead; latency from the Kafka
        timestamp of each applied message (the inbound event time) to the commit."""
        m = self.metrics
        dead = sum(1 for f in failures if f.status == "dead")
        not_applied = {(f.message.partition, f.message.offset) for f in failures}
        m.delivered(self.route.topic, len(batch) - len(not_applied))
        if dead:
            m.failed("terminal", dead)
            m.dead_lettered(dead)
        if len(failures) > dead:
            m.skipped("filtered", len(failures) - dead)
        m.batch(len(batch), seconds)
        now_ms = time.time() * 1000
        for msg in batch:
            ts_type, ts = msg.timestamp()
            if ts_type != 0 and (partition_of(msg), offset_of(msg)) not in not_applied:
                m.latency(max(0.0, (now_ms - ts) / 1000))

    def _redrive(self, conn: psycopg.Connection[Any], producer: Producer, applier: Applier,
                 convert: Converter) -> bool:
        """Re-apply tasks an operator queued with ``dx tasks retry`` (status pending, redrive),
        through the route's *current* configuration, oldest first. Offsets are not involved:
        the message was consumed long ago; the task row is the unit of exactly-once here
        (locked, re-applied and updated in one transaction). Without a conflict policy a
        redriven event overwrites newer data of its key, as the operator asked."""
        route = self.route
        with self._catalog_guard(), conn.transaction():
            rows = TaskStore(conn).lock_redrivable(route.name, route.batch_size)
            if not rows:
                return False
            events: list[Event] = []
            failures: list[Failure] = []
            attempts: dict[tuple[int, int], int] = {}
            for _id, topic, part, off, n, key, value, headers in rows:
                raw = RawMessage(topic=topic, partition=part, offset=off,
                                 key=None if key is None else bytes(key),
                                 value=None if value is None else bytes(value),
                                 headers=tuple(decode_headers(headers)))
                attempts[(part, off)] = int(n) + 1
                out = convert(raw)
                (events if isinstance(out, Event) else failures).append(out)  # type: ignore[arg-type]
            mark_origin(conn, route.system)
            failures.extend(applier.apply(events))
            failed = {(f.message.partition, f.message.offset) for f in failures}
            self.recorder.record(conn, route.name, failures,
                                 attempts=[attempts[(f.message.partition, f.message.offset)]
                                           for f in failures])
            ok = [r[0] for r in rows if (r[2], r[3]) not in failed]
            TaskStore(conn).mark_redriven(ok)
            self._dead_letter(producer, failures)
        self.stats.add(len(rows), failures)
        log.info("route %s: redrove %d tasks, %d failed again", route.name, len(rows),
                 len(failures))
        return True

    def _dead_letter(self, producer: Producer, failures: list[Failure]) -> None:
        dead = [f for f in failures if f.status == "dead"]
        if not dead:
            return
        errors: list[str] = []

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                errors.append(err.str())

        for f in dead:
            m = f.message
            headers: list[tuple[str, str | bytes | None]] = [*m.headers, *dead_letter_headers(
                route=self.route.name, topic=m.topic, partition=m.partition, offset=m.offset,
                error=f.reason, error_class="terminal:Rejected", field=f.field)]
            producer.produce(self.route.dlq_topic, key=m.key, value=m.value, headers=headers,
                             on_delivery=delivered)
        left = producer.flush(30)
        if left or errors:  # the batch rolls back; the reconnect re-creates a deleted topic
            raise TransientError(f"route {self.route.name}: dead letters to "
                                 f"{self.route.dlq_topic} not delivered "
                                 f"({errors[0] if errors else f'{left} pending'}); the batch "
                                 "is retried")
