"""``dx sink run ROUTE``: a consumer-group worker that delivers one route's events.

Threads and who owns what::

    main thread   poll Kafka ─► decode key ─► lane = crc32(key) % concurrency ─► lane queue
                  ◄─ acks (task rows committed) ─ advance per-partition watermarks ─► commit
                  every second: find keys whose dead task was retried/skipped ─► Redrive(key)
    lane threads  park | decode value | filter | map | deliver (retry, backoff) | dead-letter
                  one lane owns a key: its order and its blocked/parked state live in one thread
    task writer   batches task rows of all lanes into one transaction, then acks them

Guarantees:

* **Offsets** are committed only up to the lowest offset whose task is not yet durable in the
  task store (``enable.auto.commit`` and ``enable.auto.offset.store`` are off). A crash redelivers
  everything after that: at-least-once, with ``event_id`` as the idempotency key.
* **Per-key order**: a key always lands in the same lane and a lane handles its events in order;
  a transient failure holds the lane (backoff with jitter) rather than letting later events of
  the key overtake it.
* **Dead keys park**: when an event goes dead (terminal error, retries exhausted, poison input) it
  is produced to the dead-letter topic *before* its task is recorded, and later events of the same
  key are recorded as ``pending`` tasks with their original message (so their offsets can be
  committed) until an operator retries or skips the dead one; then the worker redelivers that
  key's pending tasks in order. Other keys keep flowing.
* **Rebalances**: each assigned partition has a generation (bumped on assign and revoke) and work
  carries the one it was polled under. A revoke stops new attempts on the partition, waits (up to
  the connector's timeout) for calls already on the wire, records and commits their outcomes,
  then bumps the generation: work still queued, retrying or backing off for it is abandoned (not
  delivered, not recorded, offset not committed) and the new owner redelivers it, so the old
  owner never delivers or records an event of the partition after the hand-over.
* **SIGTERM** sets a stop flag: polling stops, lanes abandon backoffs (those tasks become
  ``failed``, not acknowledged), in-flight requests finish, durable outcomes are committed,
  nothing else is.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import queue
import random
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from connectors import registry
from connectors.base import NOT_ATTEMPTED, Backpressure, Connector, Outcome, Record, key_text
from pipeline.config.model import DxConfig
from pipeline.config.sinks import RetryPolicy, SinkRoute
from pipeline.db import connect
from pipeline.errors import (
    ConfigError,
    DxError,
    EventError,
    ServiceUnavailable,
    TerminalError,
    TransientError,
)
from pipeline.events.wire import registry_client
from pipeline.observability import tracing
from pipeline.observability.lag import report_lag
from pipeline.observability.logging import KAFKA_LOG
from pipeline.observability.metrics import METRICS, WorkerMetrics
from pipeline.observability.server import WorkerServer
from pipeline.sink.decode import Decoder, Undecodable
from pipeline.sink.mapping import Event, MappingError, RouteLogic, jsonable
from pipeline.tasks.store import TaskRow, TaskStore, TaskWriter, ensure_schema

log = logging.getLogger(__name__)

RAW_KEEP = ("pending", "retrying", "failed", "dead")


def find_route(config: DxConfig, name: str) -> tuple[int, SinkRoute]:
    for i, r in enumerate(config.sinks):
        if r.name == name:
            return i, r
    known = ", ".join(r.name for r in config.sinks) or "none"
    file, _ = config.where("sinks")
    raise ConfigError(f"no sink route named {name!r} (routes: {known})", file=file)


def kafka_conf(config: DxConfig) -> dict[str, Any]:
    conf: dict[str, Any] = {"bootstrap.servers": config.kafka.bootstrap_servers}
    conf.update(config.kafka.client)
    return conf


# -- work items ---------------------------------------------------------------------------------


@dataclass
class Work:
    """One message on its way through a lane (fresh from Kafka, or a redriven task)."""

    topic: str
    partition: int
    offset: int
    raw_key: bytes | None
    raw_value: bytes
    headers: list[tuple[str, bytes]]
    key: dict[str, Any]
    key_text: str
    generation: int
    consumed_at: float
    attempts: int = 0
    redrive: bool = False
    # filled in by the lane
    event: Event | None = None
    record: Record | None = None
    last: Outcome | None = None
    status: str | None = None

    def coords(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass
class Redrive:
    key_text: str


_STOP = object()


class OffsetTracker:
    """Per partition: offsets handed to lanes and not yet durable. Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[tuple[str, int], set[int]] = {}
        self.high: dict[tuple[str, int], int] = {}
        self.committed: dict[tuple[str, int], int] = {}

    def add(self, topic: str, partition: int, offset: int) -> None:
        with self.lock:
            tp = (topic, partition)
            self.pending.setdefault(tp, set()).add(offset)
            self.high[tp] = max(self.high.get(tp, -1), offset)

    def done(self, topic: str, partition: int, offset: int) -> None:
        with self.lock:
            s = self.pending.get((topic, partition))
            if s is not None:
                s.discard(offset)

    def outstanding(self) -> int:
        with self.lock:
            return sum(len(s) for s in self.pending.values())

    def committable(self) -> list[TopicPartition]:
        """Offsets to commit (next offset to read) where they moved since the last commit."""
        out: list[TopicPartition] = []
        with self.lock:
            for tp, high in self.high.items():
                s = self.pending.get(tp) or set()
                nxt = min(s) if s else high + 1
                if nxt > self.committed.get(tp, -1):
                    out.append(TopicPartition(tp[0], tp[1], nxt))
        return out

    def mark_committed(self, tps: Sequence[TopicPartition]) -> None:
        with self.lock:
            for tp in tps:
                self.committed[(tp.topic, tp.partition)] = tp.offset

    def committed_offset(self, topic: str, partition: int) -> int | None:
        """The offset this worker last committed for the partition (None: none yet)."""
        with self.lock:
            return self.committed.get((topic, partition))

    def forget(self, topic: str, partition: int) -> None:
        with self.lock:
            self.pending.pop((topic, partition), None)
            self.high.pop((topic, partition), None)
            self.committed.pop((topic, partition), None)


def _trunc(value: Any, limit: int) -> Any:
    """A log entry no longer than ``limit`` bytes of JSON (text with a marker when cut)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text.encode()) <= limit:
        return value
    cut = text.encode()[:limit].decode("utf-8", "ignore")
    return f"{cut}…[truncated, {len(text.encode())} bytes]"


# -- the lane -----------------------------------------------------------------------------------


class Lane(threading.Thread):
    """Delivers the events of the keys hashed to it, in order. Owns their blocked state."""

    def __init__(self, worker: SinkWorker, index: int) -> None:
        super().__init__(name=f"lane-{index}", daemon=True)
        self.w = worker
        self.index = index
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.blocked: set[str] = set()
        self.redrive_queued: set[str] = set()
        self._store: TaskStore | None = None
        self.rnd = random.Random()  # noqa: S311 - jitter, not cryptography
        self.error: BaseException | None = None

    # -- helpers --------------------------------------------------------------------------------

    @property
    def store(self) -> TaskStore:
        if self._store is None:
            self._store = TaskStore(connect(self.w.db_url, application_name="dx-sink-lane"))
        return self._store

    def _row(self, w: Work, status: str, *, error: str | None = None,
             outcome: Outcome | None = None, dlq: dict[str, Any] | None = None) -> TaskRow:
        detail = self.w.route.log.detail
        limit = self.w.route.log.max_bytes
        full = detail == "full" or (detail == "errors" and status not in ("succeeded", "skipped"))
        import_log = export_log = None
        if full and detail != "minimal":
            if w.event is not None:
                ev = w.event
                import_log = {
                    "received": _trunc(jsonable({"op": ev.op, "key": ev.key, "before": ev.before,
                                                 "after": ev.after, "origin": ev.origin}), limit),
                    "mapped": _trunc(w.record.payload if w.record else None, limit)}
            if outcome is not None and (outcome.request or outcome.status is not None):
                export_log = {"request": _trunc(outcome.request, limit), "status": outcome.status,
                              "response": _trunc(outcome.response, limit),
                              "elapsed_ms": None if outcome.elapsed_ms is None
                              else round(outcome.elapsed_ms, 2)}
        keep_raw = status in RAW_KEEP
        return TaskRow(
            route=self.w.route.name, topic=w.topic, partition=w.partition, offset=w.offset,
            status=status, key=w.key_text,
            event_id=w.event.event_id if w.event is not None else _header(w.headers, "dx.event_id"),
            op=w.event.op if w.event is not None else None, attempts=w.attempts,
            error=error, import_log=import_log, export_log=export_log,
            raw_key=w.raw_key if keep_raw else None, raw_value=w.raw_value if keep_raw else None,
            raw_headers=[_header_row(k, v) for k, v in w.headers] if keep_raw else None,
            dlq=dlq, redrive=w.redrive and status in ("pending", "retrying", "failed"))

    def _record(self, w: Work, status: str, **kwargs: Any) -> None:
        """Queue the task row; its offset becomes committable once the row is durable.

        Nothing is written for work whose partition was revoked since it was polled: the
        partition's new owner records that event (writing here could overwrite its outcome)."""
        row = self._row(w, status, **kwargs)
        final = status not in ("retrying", "failed")
        ack: Callable[[], None] | None = None
        if final and not w.redrive:
            tracker, t, p, o = self.w.tracker, w.topic, w.partition, w.offset

            def ack() -> None:
                tracker.done(t, p, o)
        with self.w.ownership:  # a revoke bumps the generation under this lock, then flushes
            if not self.w.current(w):
                return
            self.w.writer.put(row, ack)
        w.status = status
        self.w.count(status, w.topic)

    # -- main loop ------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # surfaced by the worker's main loop
            log.exception("lane %d failed", self.index)
            self.error = err
            self.w.stop.set()

    def _loop(self) -> None:
        max_batch = self.w.batch_size
        while True:
            item = self.inbox.get()
            if item is _STOP:
                return
            items = [item]
            while len(items) < max_batch:
                try:
                    nxt = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self.inbox.put(_STOP)
                    break
                items.append(nxt)
            batch: list[Work] = []
            for it in items:
                if isinstance(it, Redrive):
                    self._deliver_all(batch)
                    batch = []
                    self._redrive(it.key_text)
                elif self.w.live(it):
                    if self.w.stop.is_set():
                        continue  # abandoned: not recorded, not acked, redelivered later
                    if self._prepare(it):
                        batch.append(it)
            self._deliver_all(batch)

    def _prepare(self, w: Work) -> bool:
        """Park, decode, filter, map. True when the work is ready for delivery."""
        with tracing.attached(w.headers):  # log lines about the event carry its trace id
            return self._prepare_event(w)

    def _prepare_event(self, w: Work) -> bool:
        if w.key_text in self.blocked and not w.redrive:
            self._record(w, "pending", error="waiting behind a dead task of the same key")
            return False
        while True:
            try:
                w.event = self.w.decoder.event(w.topic, w.partition, w.offset, w.key, w.raw_value)
                break
            except EventError as err:
                self._dead(w, err)
                return False
            except ServiceUnavailable as err:
                log.warning("%s; retrying decode of %s", err, w.coords())
                if self.w.stop.wait(1.0):
                    return False
        reason = self.w.logic.skip_reason(w.event) if w.event else None
        if reason is None:
            try:
                payload = self.w.logic.map(w.event)
            except MappingError as err:
                self._dead(w, EventError(str(err), topic=w.topic, partition=w.partition,
                                         offset=w.offset))
                return False
            except Exception as err:
                self._dead(w, EventError(f"mapping failed: {type(err).__name__}: {err}",
                                         topic=w.topic, partition=w.partition, offset=w.offset))
                return False
            ev = w.event
            w.record = Record(event_id=ev.event_id, op=ev.op, key=jsonable(ev.key),
                              payload=payload, topic=w.topic, partition=w.partition,
                              offset=w.offset, table=ev.table, origin=ev.origin,
                              ts_ms=ev.value.get("ts_ms"))
            return True
        self.w.metrics.skipped("origin" if reason and "origin" in reason else "filtered")
        if self.w.route.log.record_skipped or w.redrive:
            self._record(w, "skipped", error=reason)
        elif not w.redrive:
            self.w.tracker.done(w.topic, w.partition, w.offset)
        return False

    def _deliver_all(self, batch: list[Work]) -> None:
        """Deliver with retries until every work item has a verdict (or the worker stops, or its
        partition is revoked: then it is abandoned, unrecorded and uncommitted, for the new
        owner to redeliver)."""
        policy = self.w.route.retry
        todo = batch
        started = time.perf_counter()
        while todo:
            # before every attempt (so also after every backoff): drop work whose partition is
            # no longer owned under the generation it was polled in, and register the call so a
            # revoke waits for it to return before handing the partition over
            todo, tps = self.w.begin_call(todo)
            if not todo:
                break
            try:
                again, wait = self._attempt(todo, policy)
            finally:
                self.w.end_call(tps)
            # events left behind a key that just went dead must park, in order
            todo = []
            for w in again:
                if w.key_text in self.blocked and not w.redrive:
                    self._record(w, "pending", error="waiting behind a dead task of the same key")
                else:
                    todo.append(w)
            if todo and wait > 0 and self._backoff(todo, wait):
                self._interrupted(todo)
                return
            if todo and self.w.stop.is_set():
                self._interrupted(todo)
                return
        if batch:
            self.w.metrics.batch(len(batch), time.perf_counter() - started)

    def _backoff(self, todo: list[Work], wait: float) -> bool:
        """Wait ``wait`` seconds; True when the worker stops meanwhile. Returns early once none
        of ``todo`` is owned any more (a revoke: the next attempt abandons it)."""
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.w.stop.wait(min(left, 0.1)):
                return True
            if not any(self.w.live(w) for w in todo):
                return False

    def _attempt(self, todo: list[Work], policy: RetryPolicy) -> tuple[list[Work], float]:
        """One delivery call and its outcomes recorded: the work to try again, and the backoff."""
        now = time.monotonic()
        for w in todo:
            self.w.overhead(now - w.consumed_at)
        try:
            with self.w.metrics.timed_call():
                outcomes = self.w.connector.deliver([w.record for w in todo if w.record])
        except DxError as err:
            outcomes = [Outcome.failed(err)] * len(todo)
        except Exception as err:
            outcomes = [Outcome.failed(TransientError(f"{type(err).__name__}: {err}"))
                        ] * len(todo)
        if len(outcomes) != len(todo):
            outcomes = [Outcome.failed(TransientError(
                f"connector returned {len(outcomes)} outcomes for {len(todo)} records"))
            ] * len(todo)
        again: list[Work] = []
        wait = 0.0
        for w, o in zip(todo, outcomes, strict=True):
            w.last = o
            if o.error is NOT_ATTEMPTED:
                again.append(w)
                continue
            if w.key_text in self.blocked and not w.redrive:
                # an earlier event of this key went dead in this very batch
                self._record(w, "pending", error="waiting behind a dead task of the same key")
                continue
            throttled = isinstance(o.error, Backpressure)
            if not throttled:
                w.attempts += 1
            if o.error is None:
                self._record(w, "succeeded", outcome=o)
                self.w.commit_latency(w)
            elif not o.error.transient:
                self._dead(w, o.error, outcome=o)
            elif w.attempts >= policy.max_attempts and not throttled:
                self._dead(w, TerminalError(
                    f"gave up after {w.attempts} attempts: {o.error}"), outcome=o)
            else:
                self._record(w, "retrying", error=str(o.error), outcome=o)
                self.w.metrics.failed("transient")
                self.w.metrics.retried()
                again.append(w)
                delay = policy.delay(max(1, w.attempts), self.rnd.random())
                if isinstance(o.error, Backpressure) and o.error.retry_after is not None:
                    delay = max(delay, min(o.error.retry_after, policy.backoff_max_s))
                wait = max(wait, delay)
        return again, wait

    def _interrupted(self, todo: list[Work]) -> None:
        """The worker stops with these still undecided. A fresh event is ``failed`` (Kafka
        redelivers it: its offset is not committed); a redriven one goes back to ``pending``
        (its offset was committed long ago: it is redriven again, its key stays parked)."""
        for w in todo:
            if w.redrive:
                if w.status is not None:
                    self._record(w, "pending", error=f"worker stopped before retrying the "
                                 f"redrive: {w.last.error if w.last else ''}", outcome=w.last)
            elif w.attempts:
                self._record(w, "failed", error=f"worker stopped before retrying: "
                             f"{w.last.error if w.last else ''}", outcome=w.last)

    def _dead(self, w: Work, err: DxError, *, outcome: Outcome | None = None) -> None:
        """Dead-letter first (durably), then record the task; the key parks."""
        reason = str(err)
        if not isinstance(err, EventError) and w.coords() not in reason:
            reason = f"{w.coords()}: {reason}"
        if not self.w.current(w):
            return  # revoked: the partition's new owner decides about this event
        self.w.metrics.failed("terminal")
        with tracing.attached(w.headers):
            dlq = self.w.dead_letter(w, reason, err)
        if dlq is None:  # stopping before the dead letter was durable: not dead (yet)
            if w.redrive:
                self._record(w, "pending", error=f"worker stopped before dead-lettering: {reason}")
            else:
                self._record(w, "failed", error=f"worker stopped before dead-lettering: {reason}",
                             outcome=outcome)
            return
        if not self.w.current(w):
            return  # revoked while dead-lettering: not recorded (the new owner redelivers it)
        self.blocked.add(w.key_text)
        self._record(w, "dead", error=reason, outcome=outcome, dlq=dlq)

    def _redrive(self, key: str) -> None:
        """Redeliver a key's pending tasks in order, then unblock it (runs in this lane only,
        so no new event of the key can slip between the last pending task and the unblock)."""
        self.redrive_queued.discard(key)
        while not self.w.stop.is_set():
            self.w.writer.flush()
            rows = self.store.pending_of_key(self.w.route.name, key, self.w.owned())
            if not rows:
                if not self._has_dead(key):
                    self.blocked.discard(key)
                return
            for r in rows:
                if (r["topic"], r["partition"]) not in self.w.partitions:
                    return  # revoked meanwhile: the partition's new owner redrives the rest
                headers = [_header_value(h) for h in (r["raw_headers"] or [])]
                raw_key = bytes(r["raw_key"]) if r["raw_key"] is not None else None
                w = Work(topic=r["topic"], partition=r["partition"], offset=r["offset"],
                         raw_key=raw_key, raw_value=bytes(r["raw_value"] or b""),
                         headers=headers, key=self.w.decode_key(raw_key), key_text=key,
                         generation=-1, consumed_at=time.monotonic(),
                         attempts=int(r["attempts"]), redrive=True)
                if self._prepare(w):
                    self._deliver_all([w])
                if w.status != "succeeded" and w.status != "skipped":
                    return  # dead again (the key stays parked) or stopping
            if self.w.stop.is_set():
                return

    def _has_dead(self, key: str) -> bool:
        row = self.store.conn.execute(
            "SELECT 1 FROM dx.task WHERE route = %s AND key = %s AND status = 'dead' LIMIT 1",
            (self.w.route.name, key)).fetchone()
        self.store.conn.commit()
        return row is not None

    def close(self) -> None:
        if self._store is not None:
            self._store.conn.close()


def _headers(msg: Message) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    raw: Any = msg.headers() or []
    for k, v in raw:
        out.append((k, v if isinstance(v, bytes) else (v or "").encode()))
    return out


def _header_row(name: str, value: bytes) -> list[str]:
    """A header as the task store keeps it: ``[name, text]``, or ``[name, base64, "base64"]``
    when the value is not UTF-8 text that PostgreSQL can hold (binary, or with a NUL)."""
    try:
        text = value.decode("utf-8")
        if "\x00" not in text:
            return [name, text]
    except UnicodeDecodeError:
        pass
    return [name, base64.b64encode(value).decode(), "base64"]


def _header_value(row: list[str]) -> tuple[str, bytes]:
    """The header from its ``_header_row`` form."""
    if len(row) > 2 and row[2] == "base64":
        return str(row[0]), base64.b64decode(row[1])
    return str(row[0]), str(row[1]).encode()


def _header(headers: list[tuple[str, bytes]], name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v.decode("utf-8", "replace")
    return None


# -- the worker ---------------------------------------------------------------------------------


@dataclass
class SinkStats:
    counts: dict[str, int] = field(default_factory=dict)


class SinkWorker:
    """One route's worker. ``run()`` blocks until ``stop`` is set (SIGTERM) or a fatal error."""

    def __init__(self, config: DxConfig, route_name: str, *, keep_overheads: bool = False,
                 commit_interval_s: float = 0.5, redrive_poll_s: float = 1.0,
                 stop_when_idle_s: float | None = None, purge_interval_s: float = 3600,
                 server: WorkerServer | None = None, lag_interval_s: float = 2.0) -> None:
        self.config = config
        self.server = server if server is not None else WorkerServer(0)
        self.lag_interval_s = lag_interval_s
        self.partitions: set[tuple[str, int]] = set()  # the current assignment
        self.index, self.route = find_route(config, route_name)
        self.db_url = config.database.url.get_secret_value()
        self.stop = threading.Event()
        self.tracker = OffsetTracker()
        # ownership: a partition's generation is bumped on assign and revoke; work carries the
        # generation it was polled under and is abandoned once that is not current any more.
        # ``revoking``: partitions whose revoke waits for their in-flight calls (``inflight``)
        self.generation: dict[tuple[str, int], int] = {}
        self.ownership = threading.Condition()
        self.revoking: set[tuple[str, int]] = set()
        self.inflight: dict[tuple[str, int], int] = {}
        self.logic = RouteLogic(self.route)
        self.metrics: WorkerMetrics = METRICS.worker("sink", self.route.name)
        self.keep_overheads = keep_overheads
        self.overheads: list[float] = []
        self.commit_interval_s = commit_interval_s
        self.redrive_poll_s = redrive_poll_s
        self.stop_when_idle_s = stop_when_idle_s
        self.purge_interval_s = purge_interval_s
        self.stats = SinkStats()
        self._stats_lock = threading.Lock()
        self._dlq_topics: set[str] = set()
        self.connector: Connector[Any]
        self.writer: TaskWriter
        self.decoder: Decoder
        self.producer: Producer
        self.lanes: list[Lane] = []
        self.batch_size = self.route.batch_size
        self.assigned = threading.Event()

    # -- shared by lanes ------------------------------------------------------------------------

    def count(self, status: str, topic: str) -> None:
        with self._stats_lock:
            self.stats.counts[status] = self.stats.counts.get(status, 0) + 1
        if status == "succeeded":
            self.metrics.delivered(topic)
        elif status == "dead":
            self.metrics.dead_lettered()

    def commit_latency(self, w: Work) -> None:
        """Database commit (``source.ts_ms``) to accepted delivery of one event."""
        value = w.event.value if w.event is not None else {}
        ts_ms = (value.get("source") or {}).get("ts_ms") or value.get("ts_ms")
        if isinstance(ts_ms, int | float):
            self.metrics.latency_since(ts_ms)

    def current(self, w: Work) -> bool:
        """The work's partition is still owned under the generation it was polled in (redriven
        work checks ownership itself, before each task)."""
        return w.redrive or self.generation.get((w.topic, w.partition)) == w.generation

    def live(self, w: Work) -> bool:
        """Current, and no revoke of its partition under way: a new attempt may start."""
        return self.current(w) and (w.topic, w.partition) not in self.revoking

    def begin_call(self, todo: list[Work]) -> tuple[list[Work], list[tuple[str, int]]]:
        """The work that may be delivered now (the rest is abandoned: not delivered, not
        recorded, its offset left uncommitted), and the partitions registered as in flight."""
        with self.ownership:
            keep = [w for w in todo if self.live(w)]
            tps = sorted({(w.topic, w.partition) for w in keep})
            for tp in tps:
                self.inflight[tp] = self.inflight.get(tp, 0) + 1
        dropped = len(todo) - len(keep)
        if dropped:
            log.info("route %s: %d event(s) of revoked partitions abandoned (their new owner "
                     "delivers them)", self.route.name, dropped)
        return keep, tps

    def end_call(self, tps: list[tuple[str, int]]) -> None:
        with self.ownership:
            for tp in tps:
                n = self.inflight.get(tp, 0) - 1
                if n > 0:
                    self.inflight[tp] = n
                else:
                    self.inflight.pop(tp, None)
            self.ownership.notify_all()

    def overhead(self, seconds: float) -> None:
        if self.keep_overheads:
            self.overheads.append(seconds)

    def decode_key(self, raw: bytes | None) -> dict[str, Any]:
        try:
            return self.decoder.key(raw)
        except Undecodable:
            return {"raw": raw.hex() if raw else None}

    def dead_letter(self, w: Work, reason: str, err: DxError) -> dict[str, Any] | None:
        """Produce the original message to the dead-letter topic and wait for the broker.

        Retries until the broker acknowledges, or returns None when the worker stops first. A
        message too large for Kafka is dead-lettered as a truncated copy: the value replaced by
        a short marker, ``dx.dlq.truncated`` and ``dx.dlq.original_bytes`` headers (the original
        stays in the task store)."""
        topic = self.route.dead_letter_topic(w.topic)
        self._ensure_topic(topic)
        dx_headers = [("dx.dlq.route", self.route.name.encode()),
                      ("dx.dlq.error", reason.encode()[:4000]),
                      ("dx.dlq.error.class",
                       f"{'transient' if err.transient else 'terminal'}:{type(err).__name__}"
                       .encode()),
                      ("dx.dlq.topic", w.topic.encode()),
                      ("dx.dlq.partition", str(w.partition).encode()),
                      ("dx.dlq.offset", str(w.offset).encode()),
                      ("dx.dlq.attempts", str(w.attempts).encode()),
                      ("dx.dlq.ts_ms", str(int(time.time() * 1000)).encode())]
        key, value = w.raw_key, w.raw_value
        headers = [*w.headers, *dx_headers]
        truncated = False
        result: dict[str, Any] = {}
        done = threading.Event()

        def delivered(kerr: KafkaError | None, msg: Message) -> None:
            if kerr is not None:
                result["error"] = str(kerr)
                result["code"] = kerr.code()
            else:
                result.update(topic=msg.topic(), partition=msg.partition(), offset=msg.offset())
            done.set()

        def too_large(code: int) -> bool:
            nonlocal key, value, headers, truncated
            if code != KafkaError.MSG_SIZE_TOO_LARGE or truncated:
                return False
            size = len(w.raw_key or b"") + len(w.raw_value) + sum(
                len(k) + len(v) for k, v in w.headers)
            log.warning("dead letter of %s too large for %s (%d bytes); producing a truncated "
                        "copy", w.coords(), topic, size)
            own = [(k, v) for k, v in w.headers if len(k) + len(v) <= 1024][:32]
            key = w.raw_key if len(w.raw_key or b"") <= 4096 else None
            value = (f"[dx: value truncated, {len(w.raw_value)} bytes; the original is in the "
                     f"task store]").encode()
            headers = [*own, *dx_headers, ("dx.dlq.truncated", b"true"),
                       ("dx.dlq.original_bytes", str(size).encode())]
            truncated = True
            return True

        while not self.stop.is_set():
            result.clear()
            done.clear()
            try:
                self.producer.produce(topic, key=key, value=value,
                                      headers=list[tuple[str, str | bytes | None]](headers),
                                      on_delivery=delivered)
            except BufferError:  # the local queue is full: let it drain
                self.producer.poll(0.5)
                continue
            except KafkaException as kexc:
                kerr = kexc.args[0]
                code = kerr.code() if isinstance(kerr, KafkaError) else None
                if code is not None and too_large(code):
                    continue
                log.warning("dead-letter produce to %s failed (%s); retrying", topic, kexc)
                self.stop.wait(1)
                continue
            stop_deadline: float | None = None
            while not done.is_set():
                self.producer.poll(0.1)
                if self.stop.is_set():
                    stop_deadline = stop_deadline or time.monotonic() + 10
                    if time.monotonic() > stop_deadline:
                        return None
            if "error" not in result:
                if truncated:
                    result["truncated"] = True
                return result
            if too_large(result.get("code", 0)):
                continue
            log.warning("dead-letter produce to %s failed (%s); retrying", topic, result["error"])
            self.stop.wait(1)
        return None

    def _ensure_topic(self, topic: str) -> None:
        if topic in self._dlq_topics:
            return
        admin = AdminClient(kafka_conf(self.config), logger=KAFKA_LOG)
        futures = admin.create_topics([NewTopic(topic, num_partitions=1)], operation_timeout=10)
        for f in futures.values():
            try:
                f.result(15)
            except KafkaException as err:
                if err.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise ServiceUnavailable("kafka", self.config.kafka.bootstrap_servers,
                                             f"cannot create {topic}: {err}") from None
        self._dlq_topics.add(topic)

    # -- set-up ---------------------------------------------------------------------------------

    def _open(self) -> Consumer:
        with contextlib.closing(connect(self.db_url, autocommit=True)) as conn:
            ensure_schema(conn)
        self.writer = TaskWriter(self.db_url)
        sr = self.config.schema_registry
        auth = sr.basic_auth_user_info.get_secret_value() if sr.basic_auth_user_info else None
        self.decoder = Decoder(registry_client(sr.url, auth), sr.url)
        self.connector = registry.create(self.route.connector, route=self.route.name)
        self.batch_size = max(1, min(self.route.batch_size, self.connector.max_batch))
        try:
            self.connector.open()
        except ConfigError:
            raise
        except DxError as err:
            file, line = self.config.where("sinks", self.index, "connector")
            cls = TransientError if err.transient else TerminalError
            raise cls(f"route {self.route.name} ({file}:{line}): target check failed: "
                      f"{err}") from None
        conf = kafka_conf(self.config)
        self.producer = Producer({**conf, "enable.idempotence": True, "linger.ms": 5},
                                 logger=KAFKA_LOG)
        consumer = Consumer({
            **conf, "group.id": self.route.consumer_group, "enable.auto.commit": False,
            "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "client.id": f"dx-sink-{self.route.name}",
        }, logger=KAFKA_LOG)
        try:
            md = consumer.list_topics(timeout=10)
        except KafkaException as err:
            consumer.close()
            kerr = err.args[0]
            detail = kerr.str() if isinstance(kerr, KafkaError) else str(kerr)
            raise ServiceUnavailable("kafka", self.config.kafka.bootstrap_servers,
                                     detail) from None
        missing = [t for t in self.route.topics if t not in md.topics]
        if missing:
            log.warning("route %s: topics not there yet (waiting for them): %s",
                        self.route.name, ", ".join(missing))
        with contextlib.closing(connect(self.db_url)) as conn:
            blocked = TaskStore(conn).blocked_keys(self.route.name)
        self.lanes = [Lane(self, i) for i in range(self.route.concurrency)]
        for k in blocked:
            self.lane_for(k).blocked.add(k)
        return consumer

    def lane_for(self, key: str) -> Lane:
        return self.lanes[zlib.crc32(key.encode()) % len(self.lanes)]

    # -- run ------------------------------------------------------------------------------------

    def run(self) -> SinkStats:
        consumer = self._open()
        self.writer.start()
        for lane in self.lanes:
            lane.start()
        try:
            self._loop(consumer)
        finally:
            self._shutdown(consumer)
        for lane in self.lanes:
            if lane.error is not None:
                raise lane.error
        return self.stats

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        with self.ownership:
            for p in parts:
                key = (p.topic, p.partition)
                self.generation[key] = self.generation.get(key, 0) + 1
        # keys parked by the partitions' previous owner (it flushed its tasks before letting go)
        try:
            with contextlib.closing(connect(self.db_url)) as conn:
                for k in TaskStore(conn).blocked_keys(self.route.name):
                    self.lane_for(k).blocked.add(k)
        except DxError as err:
            log.warning("could not load parked keys: %s", err)
        self.partitions.update((p.topic, p.partition) for p in parts)
        self._readiness()
        self.assigned.set()

    def owned(self) -> list[tuple[str, int]]:
        """The (topic, partition) pairs this worker currently owns (a snapshot, any thread)."""
        while True:
            try:
                return list(self.partitions)
            except RuntimeError:  # changed size during iteration (a rebalance): read again
                continue

    def _readiness(self) -> None:
        self.server.set_assignment(len(self.partitions), stopping=self.stop.is_set())

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        """Let calls already under way for the revoked partitions return (bounded by the
        connector's timeout), record and commit what is durable, then let go: work still queued
        or retrying for them is abandoned (the new owner redelivers it)."""
        keys = {(p.topic, p.partition) for p in parts}
        timeout = float(getattr(self.connector.settings, "timeout_s", None) or 10.0) + 2.0
        deadline = time.monotonic() + timeout
        with self.ownership:
            self.revoking |= keys  # no new attempt starts on them
            while any(self.inflight.get(k) for k in keys):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("route %s: calls for revoked partitions still running after "
                                "%.0fs; letting go (their outcomes are not recorded)",
                                self.route.name, timeout)
                    break
                self.ownership.wait(left)
            for key in keys:  # from here on, nothing of the old generation is recorded
                self.generation[key] = self.generation.get(key, 0) + 1
            self.revoking -= keys
        with contextlib.suppress(Exception):
            self.writer.flush(10)
        self._commit(consumer)
        for p in parts:
            key = (p.topic, p.partition)
            self.tracker.forget(p.topic, p.partition)
            self.partitions.discard(key)
            self.metrics.forget_partition(p.topic, p.partition)
        self._readiness()

    def _loop(self, consumer: Consumer) -> None:
        consumer.subscribe(list(self.route.topics), on_assign=self._on_assign,
                           on_revoke=self._on_revoke, on_lost=self._on_revoke)
        self.server.set_ready(False, "waiting for a partition assignment")
        max_inflight = max(1000, self.batch_size * len(self.lanes) * 4)
        paused = False
        next_commit = time.monotonic() + self.commit_interval_s
        next_redrive = time.monotonic()
        next_purge = time.monotonic() + 5
        next_lag = time.monotonic()
        last_busy = time.monotonic()
        store = TaskStore(connect(self.db_url, application_name="dx-sink"))
        try:
            while not self.stop.is_set():
                self.server.heartbeat()
                msgs = consumer.consume(num_messages=500, timeout=0.1)
                for msg in msgs:
                    self._dispatch(msg)
                inflight = self.tracker.outstanding()
                if msgs or inflight or any(lane.inbox.qsize() for lane in self.lanes):
                    last_busy = time.monotonic()
                elif (self.stop_when_idle_s is not None and self.assigned.is_set()
                      and time.monotonic() - last_busy > self.stop_when_idle_s):
                    log.info("route %s idle for %.1fs; stopping", self.route.name,
                             self.stop_when_idle_s)
                    break
                if not paused and inflight > max_inflight:
                    consumer.pause(consumer.assignment())
                    paused = True
                elif paused and inflight < max_inflight // 2:
                    consumer.resume(consumer.assignment())
                    paused = False
                now = time.monotonic()
                if now >= next_commit:
                    self._commit(consumer)
                    next_commit = now + self.commit_interval_s
                if now >= next_redrive:
                    self._poll_redrives(store)
                    next_redrive = now + self.redrive_poll_s
                if now >= next_purge:
                    self._purge(store)
                    next_purge = now + self.purge_interval_s
                if now >= next_lag:
                    self._report_lag(consumer)
                    next_lag = now + self.lag_interval_s
                if self.writer.fatal is not None:
                    raise self.writer.failure()
                if self.writer.error is not None:
                    log.warning("task store unavailable: %s", self.writer.error)
        finally:
            store.conn.close()

    def _dispatch(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return
            if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                return
            if err.fatal():
                raise ServiceUnavailable("kafka", self.config.kafka.bootstrap_servers, err.str())
            log.warning("kafka: %s", err.str())
            return
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        assert topic is not None and partition is not None and offset is not None
        value = msg.value()
        self.tracker.add(topic, partition, offset)
        self.metrics.received(topic)
        if value is None:  # a tombstone: compaction's business, not a change to deliver
            self.tracker.done(topic, partition, offset)
            return
        raw_key = msg.key()
        key = self.decode_key(raw_key)
        ktext = key_text(key)
        work = Work(topic=topic, partition=partition, offset=offset, raw_key=raw_key,
                    raw_value=value, headers=_headers(msg),
                    key=key, key_text=ktext, generation=self.generation.get((topic, partition), 0),
                    consumed_at=time.monotonic())
        self.lane_for(ktext).inbox.put(work)

    def _commit(self, consumer: Consumer) -> None:
        tps = self.tracker.committable()
        if not tps:
            return
        try:
            consumer.commit(offsets=tps, asynchronous=False)
            self.tracker.mark_committed(tps)
        except KafkaException as err:
            log.warning("offset commit failed (will retry): %s", err)

    def _report_lag(self, consumer: Consumer) -> None:
        """``dx_consumer_lag_messages`` against the offsets this worker committed."""
        report_lag(consumer, self.metrics, [(t, p, self.tracker.committed_offset(t, p))
                                            for t, p in sorted(self.partitions)])

    def _purge(self, store: TaskStore) -> None:
        """Retention: drop this route's succeeded/skipped tasks older than log.retention_days."""
        try:
            n = store.purge(older_than_days=self.route.log.retention_days, route=self.route.name)
            if n:
                log.info("route %s: purged %d old tasks", self.route.name, n)
        except Exception as err:
            log.warning("task purge failed: %s", err)
            with contextlib.suppress(Exception):
                store.conn.rollback()

    def _poll_redrives(self, store: TaskStore) -> None:
        """Hand keys whose dead task was retried or skipped to their lane."""
        try:
            keys = set(store.redrive_candidates(self.route.name, self.owned()))
            blocked = [k for lane in self.lanes for k in list(lane.blocked)]
            if blocked:
                rows = store.conn.execute(
                    "SELECT k FROM unnest(%s::text[]) k EXCEPT SELECT key FROM dx.task "
                    "WHERE route = %s AND (status IN ('dead', 'pending') "
                    "OR (redrive AND status IN ('retrying', 'failed')))",
                    (blocked, self.route.name)).fetchall()
                store.conn.commit()
                keys.update(str(r[0]) for r in rows)
        except DxError as err:
            log.warning("redrive poll failed: %s", err)
            return
        except Exception as err:
            log.warning("redrive poll failed: %s", err)
            with contextlib.suppress(Exception):
                store.conn.rollback()
            return
        for k in keys:
            lane = self.lane_for(k)
            if k not in lane.redrive_queued:
                lane.redrive_queued.add(k)
                lane.inbox.put(Redrive(k))

    def _shutdown(self, consumer: Consumer) -> None:
        self.stop.set()
        self._readiness()
        for lane in self.lanes:
            lane.inbox.put(_STOP)
        timeout = 30.0
        deadline = time.monotonic() + timeout
        for lane in self.lanes:
            lane.join(max(0.1, deadline - time.monotonic()))
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
            self.producer.flush(5)
            self.connector.close()
