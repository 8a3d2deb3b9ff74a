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
import functools
import gc
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from confluent_kafka import KafkaError, KafkaException, Producer
from opentelemetry import trace

from pipeline.capture import logical
from pipeline.capture.ddl import NOTIFY_CHANNEL
from pipeline.capture.install import load_spec
from pipeline.config import DxConfig
from pipeline.db import connect, unreachable
from pipeline.errors import (
    OutboxRowError,
    ServiceUnavailable,
    TerminalError,
    TransientError,
)
from pipeline.events.topics import ensure_topics, topic_spec
from pipeline.events.wire import SchemaRegistrar, registry_client
from pipeline.observability import tracing
from pipeline.relay import identity, kafka
from pipeline.relay.encoder import Encoder, Record
from pipeline.relay.lease import Lease
from pipeline.relay.observe import RelayHooks, pause
from pipeline.relay.pump import StreamPump
from pipeline.relay.reader import Cursor, OutboxReader, OutboxRow
from pipeline.relay.stream import LogicalStream, Resolver, SlotLost

log = logging.getLogger(__name__)

#: Failed attempts at one batch before the relay gives up and exits (non-zero, one line), so an
#: orchestrator restarts it or a standby takes over, instead of retrying forever in silence.
MAX_ATTEMPTS = 12
#: logical mode, caught up: how long a batch waits for more rows after its first one, so a
#: burst shares one Kafka transaction while a lone change still leaves within milliseconds
LINGER_S = 0.004
#: logical mode, draining a backlog: one Kafka transaction carries up to this many batches
#: (each commit costs a round of broker writes; the rows are held in memory meanwhile)
DRAIN_BATCHES = 4
_RESET_HINT = ("check what reached Kafka, then start once with 'dx relay --reset-state' to "
               "publish every pending change (consumers de-duplicate by event_id)")


class RelayStateError(TerminalError):
    """The cursor stored in Kafka does not belong to this database's history."""


class KafkaFatal(TerminalError):
    """The producer cannot go on (fenced by another relay with the same transactional.id, or a
    fatal idempotence error)."""
_TRACER = trace.get_tracer("dx.relay")


@dataclass
class RelayStats:
    batches: int = 0
    events: int = 0
    records: int = 0
    last_batch_at: float = 0.0
    #: time.monotonic() when the read that returned the first rows began (start-up ends there)
    first_read_at: float = 0.0
    #: time.monotonic() when the last batch was committed
    last_commit_at: float = 0.0
    state: str = "starting"
    commit_latencies_s: list[float] = field(default_factory=list)


def _freeze_startup() -> None:
    """What start-up built (modules, schemas, generated writers) lives as long as the relay:
    kept out of the collector's full passes, which otherwise scan it all again every few
    thousand events (pauses of tens to hundreds of ms in the commit-to-Kafka latency). Garbage
    is collected first, so none is kept for good."""
    gc.collect()
    gc.freeze()


class Relay:
    def __init__(self, config: DxConfig, *, stop: threading.Event | None = None,
                 on_state: Callable[[str], None] | None = None,
                 keep_latencies: bool = False, hooks: RelayHooks | None = None,
                 reset_state: bool = False) -> None:
        self.config = config
        self.hooks = hooks or RelayHooks()
        self.stop = stop or threading.Event()
        self.stats = RelayStats()
        self.on_state = on_state
        self.keep_latencies = keep_latencies
        self.eos = config.relay.mode == "exactly-once"
        self.reset_state = reset_state
        self._errors: list[tuple[Record | None, KafkaError]] = []
        self._batch: list[Record] = []  # the records being produced (for error reports)
        self._system_id = 0
        self._producer: Producer | None = None
        self._txn_failed = False
        self._queued = False  # at-least-once: the batch's records are in the producer's queue
        self._epoch: str | None = None  # the slot's, in logical mode
        self.capture_mode = "unknown"

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
            lease = Lease(lease_conn, self.config.relay.name,
                          timeout_s=self.config.relay.lease_timeout_s)
            while not lease.try_acquire():
                self._set_state(f"standby (active: {lease.holder() or 'unknown'})")
                if self.stop.wait(self.config.relay.standby_poll_s):
                    return
            self._set_state("active")
            log.info("relay %s active", self.config.relay.name)
            self._run_active(lease, url, app_name)
        except psycopg.OperationalError as err:
            raise unreachable(url, err, "connection lost") from None
        finally:
            lease_conn.close()
            self._set_state("stopped")

    def _run_active(self, lease: Lease, url: str, app_name: str) -> None:
        conn = connect(url, application_name=app_name + ":reader", exact_json=True)
        spec_conn = connect(url, autocommit=True, application_name=app_name + ":spec")
        try:
            reader = OutboxReader(conn)
            admin = kafka.check_reachable(self.config)
            if self.eos:
                ensure_topics(admin, [topic_spec(
                    self.config.kafka, self.config.state_topic,
                    f"state topic of relay {self.config.relay.name}", partitions=1,
                    config={"cleanup.policy": "compact"})])
            sr = self.config.schema_registry
            registrar = SchemaRegistrar(
                registry_client(sr), sr.url, auto_register=self.config.relay.auto_register_schemas)
            registrar.check_reachable()
            db, system_id = reader.database_info()
            encoder = Encoder(
                registrar, prefix=self.config.kafka.topic_prefix, db=db, system_id=system_id,
                outbox_topic_template=self.config.outbox.topic_template,
                load_spec=lambda e, v: load_spec(spec_conn, e, v))
            self._system_id = system_id
            self.capture_mode = logical.installed_mode(spec_conn)
            if self.capture_mode == "logical":
                self._run_logical(lease, url, app_name, spec_conn, encoder, admin)
                return
            self._new_producer()
            cursor = self._start_cursor(reader)
            identity.settle(conn, self.config.relay.name,
                            cursor if self.eos and not self.reset_state else None)
            reader.delete_upto(cursor)
            listen = connect(url, autocommit=True, application_name=app_name + ":listen")
            try:
                listen.execute(f"LISTEN {NOTIFY_CHANNEL}")
                _freeze_startup()
                self._loop(lease, reader, encoder, admin, listen, cursor)
            finally:
                listen.close()
        finally:
            if self._producer is not None:
                self._producer.flush(10)
            spec_conn.close()
            conn.close()

    # -- logical capture ----------------------------------------------------------------------

    def _run_logical(self, lease: Lease, url: str, app_name: str,
                     spec_conn: psycopg.Connection[Any], encoder: Encoder, admin: Any) -> None:
        """Read the slot (see :mod:`pipeline.relay.stream`) on the pump's thread
        (:mod:`pipeline.relay.pump`) and deliver in batches on this one: large ones while a
        backlog drains or writes keep coming, one every ``LINGER_S`` when caught up."""
        info = logical.slot_info(spec_conn)
        slot = logical.current_slot(spec_conn)
        if info is None:
            raise SlotLost(slot, "does not exist")
        if info.lost:
            raise SlotLost(slot, "was invalidated (max_slot_wal_keep_size reached)")
        epoch = info.epoch or ""
        self._epoch = epoch
        self._new_producer()
        cursor = self._start_logical_cursor(epoch)
        catalog = connect(url, autocommit=True, application_name=app_name + ":catalog")
        stream = LogicalStream(url, slot, epoch, Resolver(catalog, self.config),
                               application_name=app_name + ":stream", skip_upto=cursor)
        batch_size = limit = self.config.relay.batch_size
        poll = self.config.relay.poll_interval_s
        pump = StreamPump(stream, max_rows=DRAIN_BATCHES * batch_size, wait_s=poll,
                          mark_confirmed=functools.partial(logical.mark_confirmed, catalog, slot))
        try:
            stream.open()
            _freeze_startup()
            pump.start()
            known_topics: set[str] = set()
            while not self.stop.is_set():
                self.hooks.tick()
                lease.check()
                read_at = time.monotonic()
                # rows the pump read while the last batch was delivered leave at once: batches
                # grow with the load; caught up, a batch leaves LINGER_S after its first row
                rows = pump.take(limit, linger_s=LINGER_S, wait_s=poll)
                if rows:
                    self._first_read(read_at)
                    self._deliver(lease, encoder, admin, known_topics, rows, pump.confirm)
                    # a full batch means a backlog: fewer, larger transactions drain it
                    limit = min(2 * limit, DRAIN_BATCHES * batch_size) \
                        if len(rows) >= limit else batch_size
                else:
                    limit = batch_size
        finally:
            pump.close()
            stream.close()
            catalog.close()

    def _start_logical_cursor(self, epoch: str) -> Cursor:
        """Where Kafka's copy ends (exactly-once): rows at or below it are skipped on replay.
        At-least-once relies on the slot's confirmed position alone."""
        name = self.config.relay.name
        if self.reset_state:
            if self.eos:
                self._produce_transaction([], Cursor())
            log.warning("relay %s: state reset; publishing from the slot's position", name)
            return Cursor()
        if not self.eos:
            return Cursor()
        state = kafka.read_state(self.config)
        self._check_system(state)
        if state.mode != "logical":
            return Cursor()  # first logical run: the slot's position is where to start
        if state.epoch != epoch:
            raise RelayStateError(
                f"relay {name}: the replication slot was created again since the last "
                f"delivered change (epoch {state.epoch} in {self.config.state_topic}, slot "
                f"epoch {epoch}): changes in between were never read; follow the README "
                "runbook 'lost replication slot' (dx snapshot, then dx relay --reset-state)")
        return state.cursor

    def _check_system(self, state: kafka.RelayState) -> None:
        if state.system is not None and state.system != self._system_id:
            raise RelayStateError(
                f"relay {self.config.relay.name}: the cursor in {self.config.state_topic} "
                f"belongs to database system {state.system}, this is {self._system_id}; "
                f"{_RESET_HINT}")

    def _new_producer(self) -> Producer:
        """A fresh producer; in exactly-once mode init_transactions also aborts whatever a
        previous incarnation (this process's or a dead relay's) left open, and fences it."""
        producer = kafka.make_producer(self.config)
        if self.eos:
            self._kafka_call(lambda: producer.init_transactions(30))
        self._producer = producer
        return producer

    def _start_cursor(self, reader: OutboxReader) -> Cursor:
        """Where to resume. A cursor from Kafka is checked against this database first: after a
        restore or a fail-over to a replica that lost commits, the sequence restarts below it,
        and trusting it would delete new changes unpublished."""
        name = self.config.relay.name
        if self.reset_state:
            if self.eos:
                self._produce_transaction([], Cursor())
            reader.delete_upto(Cursor(), relay_name=name)
            log.warning("relay %s: cursor reset; every pending outbox row will be published",
                        name)
            return Cursor()
        if not self.eos:
            return reader.load_cursor(name)
        state = kafka.read_state(self.config)
        self._check_system(state)
        if state.mode == "logical":
            return Cursor()  # the last run captured logically: the outbox starts afresh
        cursor, hint = state.cursor, _RESET_HINT
        latest = reader.peek()
        if cursor.seq > latest:
            raise RelayStateError(
                f"relay {name}: the cursor in {self.config.state_topic} (commit {cursor.seq}) is "
                f"ahead of this database's commit sequence ({latest}): it was restored or failed "
                f"over and lost commits; {hint}")
        return cursor

    # -- the loop -------------------------------------------------------------------------

    def _loop(self, lease: Lease, reader: OutboxReader, encoder: Encoder,
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
            read_at = time.monotonic()
            rows = reader.fetch(cursor, frontier, batch_size) \
                if more or frontier > cursor.seq else []
            more = len(rows) == batch_size
            if rows:
                self._first_read(read_at)
                # exactly-once: the cursor of record is in Kafka, dx.relay_state is for status
                cursor = self._deliver(lease, encoder, admin, known_topics, rows, functools.partial(
                    reader.delete_upto, relay_name=self.config.relay.name))
                if more:
                    continue
            if time.monotonic() - last_purge > 5:
                reader.purge_markers()
                last_purge = time.monotonic()
            if not rows:
                self._wait(listen)

    def _first_read(self, at: float) -> None:
        if not self.stats.first_read_at:
            self.stats.first_read_at = at

    def _wait(self, listen: psycopg.Connection[Any]) -> None:
        """Sleep until NOTIFY (a hint) or the poll interval (the ground truth)."""
        for _ in listen.notifies(timeout=self.config.relay.poll_interval_s, stop_after=1):
            break

    def _deliver(self, lease: Lease, encoder: Encoder, admin: Any, known_topics: set[str],
                 rows: list[OutboxRow], delivered: Callable[[Cursor], None]) -> Cursor:
        """Encode and deliver one batch, retrying transient failures (registry, broker) with
        backoff; the outbox rows stay until Kafka has them, so a retry loses nothing. A row
        that cannot be published (OutboxRowError) and a fenced producer stop the relay."""
        new_cursor = rows[-1].cursor
        attempt = 0
        started = time.perf_counter()
        records: list[Record] = []
        while True:
            lease.check(every_s=0)  # a relay that lost its lease must not publish again
            try:
                records = [r for row in rows for r in encoder.encode(row)]
                new_topics = {r.topic for r in records} - known_topics
                if new_topics:
                    ensure_topics(admin, [
                        topic_spec(self.config.kafka, t, f"topic of relay {self.config.relay.name}")
                        for t in sorted(new_topics)])
                    known_topics |= new_topics
                if self.eos:
                    self._produce_transaction(records, new_cursor)
                else:
                    self._produce_flush(records)
                delivered(new_cursor)
                break
            except TransientError as err:
                attempt += 1
                self.hooks.retry()
                if self.stop.is_set() or attempt >= MAX_ATTEMPTS:
                    raise
                # only a Kafka transaction that may or may not have committed needs a new
                # producer and a look at the state topic; a registry outage does not
                if self.eos and self._txn_failed and self._recovered(new_cursor):
                    delivered(new_cursor)
                    break
                delay = min(30.0, 0.5 * 2 ** min(attempt, 6))
                log.warning("relay batch failed (attempt %d of %d), retrying in %.1fs: %s",
                            attempt, MAX_ATTEMPTS, delay, err)
                pause(self.stop, delay, self.hooks)  # heartbeats on while retrying
        now = time.time()
        self.stats.batches += 1
        self.stats.events += len(rows)
        self.stats.records += len(records)
        self.stats.last_batch_at = now
        self.stats.last_commit_at = time.monotonic()
        self.hooks.batch(rows, records, time.perf_counter() - started)
        if self.keep_latencies:
            self.stats.commit_latencies_s.extend(
                now - r.committed_at.timestamp() for r in rows)
        return new_cursor

    def _recovered(self, new_cursor: Cursor) -> bool:
        """After a failed Kafka transaction: a new producer (init_transactions settles the old
        one's transaction either way), then the state topic says whether the batch made it —
        a commit that timed out on our side may have succeeded on the broker's."""
        try:
            if self._producer is not None:
                self._producer.flush(0)
            self._new_producer()
            state = kafka.read_state(self.config)
        except TransientError as err:
            log.warning("relay could not re-establish its producer yet: %s", err)
            return False
        self._txn_failed = False
        return (state.mode == "logical") == (self._epoch is not None) and \
            state.cursor >= new_cursor

    def _on_delivery(self, err: Any, msg: Any) -> None:
        """One callback for every record (the producer reports only failures): the failed
        record is looked up in the batch then, instead of a closure made per record."""
        if err is None:
            return
        rec = next((r for r in self._batch if r.topic == msg.topic() and r.key == msg.key()
                    and r.value == msg.value()), None)
        self._errors.append((rec, err))

    def _too_large(self, rec: Record) -> OutboxRowError:
        row = rec.row
        return OutboxRowError(
            f"its record for {rec.topic} ({len(rec.value or b'')} bytes) is larger than Kafka "
            "accepts (message.max.bytes); raise the limit (kafka.client and the topic's "
            "max.message.bytes) or stop exposing the large column",
            entity=row.entity, seq=row.seq, id=row.id, key=json.dumps(row.key, default=str))

    def _produce_all(self, records: list[Record]) -> None:
        producer = self._producer
        assert producer is not None
        self._batch = records
        # one span per batch; without an OpenTelemetry SDK it is a no-op and adds no headers
        with _TRACER.start_as_current_span("dx.relay.batch"):
            trace_headers = tracing.inject()
            for rec in records:
                headers = [*rec.headers, *trace_headers] if trace_headers else rec.headers
                while True:
                    try:
                        producer.produce(rec.topic, value=rec.value, key=rec.key,
                                         headers=headers,
                                         on_delivery=self._on_delivery)
                        break
                    except BufferError:
                        producer.poll(0.05)
                    except KafkaException as exc:
                        if exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:
                            raise self._too_large(rec) from None
                        raise
                producer.poll(0)

    def _check_delivered(self, remaining: int) -> None:
        for rec, err in self._errors:
            if rec is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                raise self._too_large(rec)
        if remaining or self._errors:
            detail = (f"{self._errors[0][0].topic if self._errors[0][0] else 'state'}: "
                      f"{self._errors[0][1]}") if self._errors \
                else f"{remaining} records unacknowledged"
            raise TransientError(f"kafka did not acknowledge the batch: {detail}")

    def _produce_flush(self, records: list[Record]) -> None:
        """At-least-once. Records are never timed out (see ``kafka.producer_config``), so a
        retry after a flush that timed out waits for the records still queued instead of
        queueing a second copy behind them; after a failed record (the producer stopped at the
        gap) a new producer sends the whole batch again, so nothing newer precedes the records
        it repeats."""
        producer = self._producer
        assert producer is not None
        if self._errors:
            producer.purge()
            producer = self._new_producer()
            self._queued = False
        if not self._queued:  # (the producer's own length also counts its protocol requests)
            self._errors.clear()
            try:
                self._produce_all(records)
            except KafkaException as exc:
                self._errors.append((None, exc.args[0]))
                raise TransientError(f"kafka refused a record: {exc.args[0]}") from None
            self._queued = True
        self._check_delivered(producer.flush(60))
        self._queued = False

    def _produce_transaction(self, records: list[Record], new_cursor: Cursor) -> None:
        producer = self._producer
        assert producer is not None
        self._errors.clear()
        self._txn_failed = True  # until the commit returns: _recovered() must settle it
        try:
            producer.begin_transaction()
        except KafkaException as exc:
            self._raise_kafka(exc.args[0], "could not begin a transaction")
        try:
            self._produce_all(records)
            topic, key, value = kafka.state_record(self.config, new_cursor, self._system_id,
                                                   self._epoch)
            producer.produce(topic, key=key, value=value,
                             on_delivery=self._on_delivery)
            producer.flush(60)
            self._check_delivered(0)
            producer.commit_transaction(60)
            self._txn_failed = False
        except BaseException as exc:
            # whatever failed, this transaction must not stay open: abort it (a later
            # begin_transaction would fail forever otherwise); if even that fails, the caller
            # replaces the producer
            with contextlib.suppress(KafkaException):
                producer.abort_transaction(30)
            if isinstance(exc, KafkaException):
                self._raise_kafka(exc.args[0], "transaction failed")
            raise

    def _raise_kafka(self, err: KafkaError, what: str) -> None:
        if err.fatal():
            raise KafkaFatal(f"kafka producer stopped for good ({what}): {err}; another relay "
                             "with the same transactional.id took over, or the broker fenced "
                             "this one") from None
        raise TransientError(f"kafka {what}: {err}") from None

    def _kafka_call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except KafkaException as exc:
            raise ServiceUnavailable("kafka", self.config.kafka.bootstrap_servers,
                                     str(exc.args[0])) from None
