"""``dx relay``: the main loop.

Per batch: read rows up to the commit frontier, encode, produce; then
- exactly-once: the cursor goes to the state topic inside the same Kafka transaction, and the
  delivered rows are deleted afterwards (a crash in between is healed on start by reading the
  cursor back and deleting what it covers);
- at-least-once: flush, and only when every record is acknowledged delete the rows and store the
  cursor in one PostgreSQL transaction. A failed batch is produced again (same ``event_id``s).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from confluent_kafka import KafkaException, Producer
from opentelemetry import trace

from pipeline.capture.ddl import NOTIFY_CHANNEL
from pipeline.capture.install import load_spec
from pipeline.config import DxConfig
from pipeline.db import connect
from pipeline.errors import ServiceUnavailable, TransientError
from pipeline.events.wire import SchemaRegistrar, registry_client
from pipeline.observability import tracing
from pipeline.relay import kafka
from pipeline.relay.encoder import Encoder, Record
from pipeline.relay.lease import Lease
from pipeline.relay.observe import RelayHooks
from pipeline.relay.reader import Cursor, OutboxReader, OutboxRow

log = logging.getLogger(__name__)
_TRACER = trace.get_tracer("dx.relay")


@dataclass
class RelayStats:
    batches: int = 0
    events: int = 0
    records: int = 0
    last_batch_at: float = 0.0
    state: str = "starting"
    commit_latencies_s: list[float] = field(default_factory=list)


class Relay:
    def __init__(self, config: DxConfig, *, stop: threading.Event | None = None,
                 on_state: Callable[[str], None] | None = None,
                 keep_latencies: bool = False, hooks: RelayHooks | None = None) -> None:
        self.config = config
        self.hooks = hooks or RelayHooks()
        self.stop = stop or threading.Event()
        self.stats = RelayStats()
        self.on_state = on_state
        self.keep_latencies = keep_latencies
        self.eos = config.relay.mode == "exactly-once"
        self._errors: list[str] = []

    # -- lifecycle ------------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        self.stats.state = state
        self.hooks.state(state)
        if self.on_state:
            self.on_state(state)

    def run(self) -> None:
        url = self.config.database.url.get_secret_value()
        app_name = f"dx-relay:{self.config.relay.name}:{socket.gethostname()}:{os.getpid()}"
        lease_conn = connect(url, autocommit=True, application_name=app_name)
        try:
            lease = Lease(lease_conn, self.config.relay.name)
            while not lease.try_acquire():
                self._set_state(f"standby (active: {lease.holder() or 'unknown'})")
                if self.stop.wait(self.config.relay.standby_poll_s):
                    return
            self._set_state("active")
            log.info("relay %s active", self.config.relay.name)
            self._run_active(lease, url, app_name)
        finally:
            lease_conn.close()
            self._set_state("stopped")

    def _run_active(self, lease: Lease, url: str, app_name: str) -> None:
        conn = connect(url, application_name=app_name + ":reader", exact_json=True)
        listen = connect(url, autocommit=True, application_name=app_name + ":listen")
        producer: Producer | None = None
        try:
            listen.execute(f"LISTEN {NOTIFY_CHANNEL}")
            reader = OutboxReader(conn)
            admin = kafka.check_reachable(self.config)
            if self.eos:
                kafka.ensure_topics(admin, {self.config.state_topic: {
                    "cleanup.policy": "compact"}})
            sr = self.config.schema_registry
            registrar = SchemaRegistrar(
                registry_client(sr.url, sr.basic_auth_user_info.get_secret_value()
                                if sr.basic_auth_user_info else None),
                sr.url, auto_register=self.config.relay.auto_register_schemas)
            registrar.check_reachable()
            db, system_id = reader.database_info()
            spec_conn = connect(url, autocommit=True, application_name=app_name + ":spec")
            encoder = Encoder(
                registrar, prefix=self.config.kafka.topic_prefix, db=db, system_id=system_id,
                outbox_topic_template=self.config.outbox.topic_template,
                load_spec=lambda e, v: load_spec(spec_conn, e, v))
            producer = kafka.make_producer(self.config)
            if self.eos:
                self._kafka_call(lambda: producer.init_transactions(30))
                cursor = kafka.read_state_cursor(self.config)
            else:
                cursor = reader.load_cursor(self.config.relay.name)
            reader.delete_upto(cursor)
            self._loop(lease, reader, encoder, producer, admin, listen, cursor)
        finally:
            if producer is not None:
                producer.flush(10)
            listen.close()
            conn.close()

    # -- the loop -------------------------------------------------------------------------

    def _loop(self, lease: Lease, reader: OutboxReader, encoder: Encoder, producer: Producer,
              admin: Any, listen: psycopg.Connection[Any], cursor: Cursor) -> None:
        batch_size = self.config.relay.batch_size
        frontier = 0
        last_peek = -1
        known_topics: set[str] = set()
        last_purge = time.monotonic()
        more = True  # a full batch means more rows may be waiting at the same frontier
        while not self.stop.is_set():
            self.hooks.tick()
            lease.check()
            peek = reader.peek()
            if peek != last_peek or frontier < peek:
                frontier = reader.frontier()
                last_peek = peek
            rows = reader.fetch(cursor, frontier, batch_size) \
                if more or frontier > cursor.seq else []
            more = len(rows) == batch_size
            if rows:
                cursor = self._deliver(producer, encoder, admin, known_topics, rows, reader)
                if more:
                    continue
            if time.monotonic() - last_purge > 5:
                reader.purge_markers()
                last_purge = time.monotonic()
            if not rows:
                self._wait(listen)

    def _wait(self, listen: psycopg.Connection[Any]) -> None:
        """Sleep until NOTIFY (a hint) or the poll interval (the ground truth)."""
        for _ in listen.notifies(timeout=self.config.relay.poll_interval_s, stop_after=1):
            break

    def _deliver(self, producer: Producer, encoder: Encoder, admin: Any, known_topics: set[str],
                 rows: list[OutboxRow], reader: OutboxReader) -> Cursor:
        """Encode and deliver one batch, retrying transient failures (registry, broker) with
        backoff; the outbox rows stay until Kafka has them, so a retry loses nothing."""
        new_cursor = rows[-1].cursor
        attempt = 0
        started = time.perf_counter()
        while True:
            try:
                records = [r for row in rows for r in encoder.encode(row)]
                new_topics = {r.topic for r in records} - known_topics
                if new_topics:
                    kafka.ensure_topics(admin, {t: {} for t in new_topics})
                    known_topics |= new_topics
                if self.eos:
                    self._produce_transaction(producer, records, new_cursor)
                    # the cursor of record is in Kafka; dx.relay_state is kept for 'dx status'
                    reader.delete_upto(new_cursor, relay_name=self.config.relay.name)
                else:
                    self._produce_flush(producer, records)
                    reader.delete_upto(new_cursor, relay_name=self.config.relay.name)
                break
            except TransientError as err:
                attempt += 1
                self.hooks.retry()
                if self.stop.is_set():
                    raise
                delay = min(30.0, 0.5 * 2 ** min(attempt, 6))
                log.warning("relay batch failed (attempt %d), retrying in %.1fs: %s",
                            attempt, delay, err)
                self.stop.wait(delay)
        now = time.time()
        self.stats.batches += 1
        self.stats.events += len(rows)
        self.stats.records += len(records)
        self.stats.last_batch_at = now
        self.hooks.batch(rows, records, time.perf_counter() - started)
        if self.keep_latencies:
            self.stats.commit_latencies_s.extend(
                now - r.committed_at.timestamp() for r in rows)
        return new_cursor

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")

    def _produce_all(self, producer: Producer, records: list[Record]) -> None:
        # one span per batch; without an OpenTelemetry SDK it is a no-op and adds no headers
        with _TRACER.start_as_current_span("dx.relay.batch"):
            trace_headers = tracing.inject()
            for rec in records:
                headers = [*rec.headers, *trace_headers] if trace_headers else rec.headers
                while True:
                    try:
                        producer.produce(rec.topic, value=rec.value, key=rec.key,
                                         headers=headers, on_delivery=self._on_delivery)
                        break
                    except BufferError:
                        producer.poll(0.05)
                producer.poll(0)

    def _produce_flush(self, producer: Producer, records: list[Record]) -> None:
        self._errors.clear()
        self._produce_all(producer, records)
        remaining = producer.flush(60)
        if remaining or self._errors:
            detail = self._errors[0] if self._errors else f"{remaining} records unacknowledged"
            raise TransientError(f"kafka did not acknowledge the batch: {detail}")

    def _produce_transaction(self, producer: Producer, records: list[Record],
                             new_cursor: Cursor) -> None:
        self._errors.clear()
        try:
            producer.begin_transaction()
            self._produce_all(producer, records)
            topic, key, value = kafka.state_record(self.config, new_cursor)
            producer.produce(topic, key=key, value=value, on_delivery=self._on_delivery)
            producer.commit_transaction(60)
        except KafkaException as exc:
            err = exc.args[0]
            if err.txn_requires_abort():
                with contextlib.suppress(KafkaException):
                    producer.abort_transaction(30)
                raise TransientError(f"kafka transaction aborted: {err}") from None
            if err.retriable():
                raise TransientError(f"kafka transaction failed: {err}") from None
            raise ServiceUnavailable("kafka", self.config.kafka.bootstrap_servers,
                                     f"fatal producer error: {err}") from None

    def _kafka_call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except KafkaException as exc:
            raise ServiceUnavailable("kafka", self.config.kafka.bootstrap_servers,
                                     str(exc.args[0])) from None
