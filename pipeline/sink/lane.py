"""A lane: delivers the events of the keys hashed to it, each key in order, no key waiting for
another.

A lane keeps, per key, the queue of its unfinished events. A key is *ready* (its head may be
tried now) or *waiting* (its head failed transiently and backs off until a due time). Each round
takes the heads of ready keys into one batch (several events of one key in order, while they
are deliverable), delivers it, and settles every outcome: decided events leave their queue, the
undecided go back to the front of it. A key backing off holds back only its own later events,
never those of other keys (no head-of-line blocking).

Per-key order: a later event of a key is never sent before an earlier one succeeded, was
skipped or went dead. An event that cannot be delivered (undecodable, unmappable, filtered) is
decided only when it is at the head of its key with nothing of the key in flight, so it parks or
goes dead in its original order. When an event goes dead its key *parks*: later events are
recorded ``pending`` until an operator retries or skips the dead one (then the worker asks the
lane to redrive the key: its pending tasks go through the same queue, in order).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import psycopg

from connectors.base import (
    NOT_ATTEMPTED,
    Backpressure,
    Connector,
    Outcome,
    Record,
    call_scope,
)
from pipeline.config.sinks import SinkRoute
from pipeline.errors import DxError, EventError, ServiceUnavailable, TerminalError, TransientError
from pipeline.observability import tracing
from pipeline.observability.metrics import WorkerMetrics
from pipeline.sink.breaker import Breaker
from pipeline.sink.deadletter import DeadLetters
from pipeline.sink.decode import Decoder
from pipeline.sink.mapping import MappingError, RouteLogic, jsonable
from pipeline.sink.ownership import Ownership
from pipeline.sink.recorder import Recorder
from pipeline.sink.work import KeyId, Work, position
from pipeline.tasks.headers import decode_headers
from pipeline.tasks.store import TaskStore
from pipeline.tasks.writer import TaskWriter

log = logging.getLogger(__name__)

STOP = object()
PARKED = "waiting behind a dead task of the same key"


class Redrive:
    """Ask a lane to redeliver a key's pending tasks (the operator resolved its dead task)."""

    def __init__(self, key: KeyId) -> None:
        self.key = key


class Lane(threading.Thread):
    def __init__(self, index: int, *, route: SinkRoute, logic: RouteLogic, decoder: Decoder,
                 connector: Connector[Any], ownership: Ownership, recorder: Recorder,
                 writer: TaskWriter, dead_letters: DeadLetters, breaker: Breaker,
                 metrics: WorkerMetrics, stop: threading.Event, db_url: str, batch_size: int,
                 decode_key: Callable[[bytes | None], dict[str, Any]],
                 overhead: Callable[[float], None]) -> None:
        super().__init__(name=f"lane-{index}", daemon=True)
        self.index = index
        self.route = route
        self.logic = logic
        self.decoder = decoder
        self.connector = connector
        self.ownership = ownership
        self.recorder = recorder
        self.writer = writer
        self.dead_letters = dead_letters
        self.breaker = breaker
        self.metrics = metrics
        self.stop = stop
        self.db_url = db_url
        self.batch_size = batch_size
        self.decode_key = decode_key
        self.overhead = overhead
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.keys: dict[KeyId, deque[Work]] = {}  # unfinished events per key, in order
        self.ready: deque[KeyId] = deque()  # keys whose head may be tried now
        self.waiting: list[tuple[float, int, KeyId]] = []  # (due, seq, key): backing off
        self._seq = 0
        self._epoch = -1
        self.blocked: set[KeyId] = set()  # parked keys (a dead task holds them)
        self.redrive_queued: set[KeyId] = set()
        self._store: TaskStore | None = None
        self.rnd = random.Random()  # noqa: S311 - jitter, not cryptography
        self.error: BaseException | None = None

    # -- the worker's side -------------------------------------------------------------------------

    def park(self, keys: set[KeyId]) -> None:
        """Keys the task store says are parked (their dead or pending tasks were written by an
        earlier run or the partition's previous owner)."""
        self.blocked |= keys

    def request_redrive(self, key: KeyId) -> None:
        if key not in self.redrive_queued:
            self.redrive_queued.add(key)
            self.inbox.put(Redrive(key))

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    # -- loop --------------------------------------------------------------------------------------

    @property
    def store(self) -> TaskStore:
        if self._store is None:
            self._store = TaskStore.open(self.db_url, "dx-sink-lane")
        return self._store

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # surfaced by the worker's main loop
            log.exception("lane %d failed", self.index)
            self.error = err
            self.stop.set()

    def _loop(self) -> None:
        while not self.stop.is_set():
            go, probe = (self.breaker.permit() if self.ready else (False, False))
            if not go:
                if not self._receive(self._idle_s()):
                    break
                continue
            self._receive(0)
            # a probe is one request: one record, or one bulk request's batch
            batch = self._next_batch(1 if probe and self.connector.sends_one_at_a_time
                                     else self.batch_size)
            if not batch:
                if probe:
                    self.breaker.release()
                continue
            self._deliver(batch, probe)
        self._interrupted()

    def _idle_s(self) -> float:
        """How long to wait for new work: until the next key is due (or the breaker's probe),
        at most 0.2 s so stops and revokes are noticed."""
        wait = 0.2
        if self.waiting:
            wait = min(wait, max(0.0, self.waiting[0][0] - time.monotonic()))
        if self.ready:
            wait = min(wait, self.breaker.wait_s())
        return wait

    def _receive(self, timeout: float) -> bool:
        """Take what arrived (waiting up to ``timeout`` for the first item), wake keys whose
        backoff is over. False on STOP."""
        try:
            item = self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait()
        except queue.Empty:
            item = None
        while item is not None:
            if item is STOP:
                self.stop.set()
                return False
            if isinstance(item, Redrive):
                self._redrive(item.key)
            else:
                self._enqueue(item, front=False)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None
        self._wake()
        return True

    def _enqueue(self, w: Work, *, front: bool) -> None:
        q = self.keys.get(w.ident)
        if q is None:
            q = self.keys[w.ident] = deque()
            self.ready.append(w.ident)
        if front:
            q.appendleft(w)
        else:
            q.append(w)

    def _wake(self) -> None:
        now = time.monotonic()
        if self.ownership.epoch != self._epoch:  # a rebalance: abandoned work waits no more
            self._epoch = self.ownership.epoch
            keep = []
            for due, seq, key in self.waiting:
                q = self.keys.get(key)
                if q and self.ownership.current(q[0]):
                    keep.append((due, seq, key))
                else:
                    self.ready.append(key)
            heapq.heapify(keep)
            self.waiting = keep
        while self.waiting and self.waiting[0][0] <= now:
            self.ready.append(heapq.heappop(self.waiting)[2])

    def _schedule(self, key: KeyId, due: float | None) -> None:
        """Put a key back after a round: ready, waiting until ``due``, or gone when empty."""
        if not self.keys.get(key):
            self.keys.pop(key, None)
            return
        if due is None or due <= time.monotonic():
            self.ready.append(key)
        else:
            self._seq += 1
            heapq.heappush(self.waiting, (due, self._seq, key))

    # -- a round -----------------------------------------------------------------------------------

    def _next_batch(self, limit: int) -> list[Work]:
        """Heads of ready keys, each key's events in order while they are deliverable; what is
        decided without delivery (parked, filtered, dead on arrival) is decided here, at the
        head of its key."""
        batch: list[Work] = []
        rounds = len(self.ready)
        while rounds and len(batch) < limit:
            rounds -= 1
            key = self.ready.popleft()
            q = self.keys.get(key)
            taken = 0
            while q and len(batch) < limit:
                w = q[0]
                if not self.ownership.current(w):
                    q.popleft()  # revoked: abandoned, the partition's new owner redelivers it
                    continue
                if key in self.blocked and not w.redrive:
                    if taken:
                        break
                    q.popleft()
                    self.recorder.record(w, "pending", error=PARKED)
                    continue
                self._prepare(w)
                if w.record is None:
                    if taken or self.stop.is_set():
                        break
                    q.popleft()
                    self._decide_undeliverable(w)
                    if w.redrive:
                        self._redrive_settled(key, w)
                    continue
                q.popleft()
                batch.append(w)
                taken += 1
            if taken == 0:
                self._schedule(key, None)
        return batch

    def _prepare(self, w: Work) -> None:
        """Decode, filter, map (once): ``w.record``, or ``w.problem`` / ``w.skip``."""
        if w.prepared:
            return
        with tracing.attached(w.headers):
            while w.event is None:
                try:
                    w.event = self.decoder.event(w.topic, w.partition, w.offset, w.key,
                                                 w.raw_value)
                except EventError as err:
                    w.problem = err
                    return
                except ServiceUnavailable as err:
                    log.warning("%s; retrying decode of %s", err, w.coords())
                    if self.stop.wait(1.0):
                        w.problem = None
                        return
            reason = self.logic.skip_reason(w.event)
            if reason is not None:
                w.skip = reason
                return
            try:
                payload = self.logic.map(w.event)
            except MappingError as err:
                w.problem = EventError(str(err), topic=w.topic, partition=w.partition,
                                       offset=w.offset)
                return
            except Exception as err:
                w.problem = EventError(f"mapping failed: {type(err).__name__}: {err}",
                                       topic=w.topic, partition=w.partition, offset=w.offset)
                return
            ev = w.event
            w.record = Record(event_id=ev.event_id, op=ev.op, key=jsonable(ev.key),
                              payload=payload, topic=w.topic, partition=w.partition,
                              offset=w.offset, table=ev.table, origin=ev.origin,
                              ts_ms=ev.value.get("ts_ms"), position=position(w))

    def _decide_undeliverable(self, w: Work) -> None:
        if w.problem is not None:
            self._dead(w, w.problem)
        elif w.skip is not None:
            self.metrics.skipped("origin" if "origin" in w.skip else "filtered")
            if self.route.log.record_skipped or w.redrive:
                self.recorder.record(w, "skipped", error=w.skip)
            else:
                self.recorder.finish_unrecorded(w)
        # else: stopping while the registry was down: abandoned (Kafka redelivers it)

    def _deliver(self, batch: list[Work], probe: bool) -> None:
        """One round: deliver ``batch`` (record by record where the connector sends one at a
        time, so ownership and the breaker are checked before each request), settle every
        outcome, put the undecided back at the front of their keys."""
        started = time.perf_counter()
        calls = ([[w] for w in batch] if self.connector.sends_one_at_a_time else [batch])
        held: dict[KeyId, list[Work]] = {}  # undecided, per key, in order
        due: dict[KeyId, float | None] = {}
        redriven: dict[KeyId, Work] = {}  # the last redriven task decided, per key
        for n, call in enumerate(calls):
            todo: list[Work] = []
            for w in call:
                if w.ident in self.blocked and not w.redrive:
                    # an earlier event of its key went dead in this round
                    self.recorder.record(w, "pending", error=PARKED)
                elif w.ident in held or (n and not self.breaker.closed()) or self.stop.is_set():
                    held.setdefault(w.ident, []).append(w)  # not attempted
                    due.setdefault(w.ident, None)
                else:
                    todo.append(w)
            if not todo:
                continue
            live, tps = self.ownership.begin(todo)
            try:  # on the wire until settled: a revoke waits for the outcomes to be recorded
                outcomes = self._call(live) if live else []
                counted = (None if self.connector.sends_one_at_a_time
                           else self._note_request(outcomes, probe))
                for w, o in zip(live, outcomes, strict=True):
                    later = self._settle(w, o, probe, counted)
                    if later is not None:
                        held.setdefault(w.ident, []).append(w)
                        if later > 0:
                            due[w.ident] = max(due.get(w.ident) or 0.0, later)
                        else:
                            due.setdefault(w.ident, None)
                    elif w.redrive:
                        redriven[w.ident] = w
            finally:
                self.ownership.end(tps)
        if probe:
            self.breaker.release()  # the probe's outcome, if any, was recorded above
        if not self.connector.sends_one_at_a_time:
            # a bulk request's records back off together and are retried as the same batch
            # (the request's Idempotency-Key derives from its event ids): with a jittered due
            # per key they came back one by one, and a target de-duplicating by the key saw
            # new requests instead of a retry
            together = max((d for d in due.values() if d), default=None)
            due = {key: together if d else d for key, d in due.items()}
        for key, works in held.items():
            q = self.keys.setdefault(key, deque())
            q.extendleft(reversed(works))
        for key, w in redriven.items():
            self._redrive_settled(key, w)
        for key in dict.fromkeys(w.ident for w in batch):  # in batch order
            self._schedule(key, due.get(key))
        self.metrics.batch(len(batch), time.perf_counter() - started)

    def _call(self, todo: list[Work]) -> list[Outcome]:
        now = time.monotonic()
        mark = self.breaker.answers
        for w in todo:
            if w.answers_mark < 0:  # its first attempt in this run
                w.answers_mark = mark
            if not w.attempts and not w.redrive:
                self.overhead(now - w.consumed_at)
        try:
            with self.metrics.timed_call(), call_scope(
                    lambda: all(self.ownership.live(w) for w in todo)):
                outcomes = self.connector.deliver([w.record for w in todo if w.record])
        except DxError as err:
            outcomes = [Outcome.failed(err)] * len(todo)
        except Exception as err:
            outcomes = [Outcome.failed(TransientError(f"{type(err).__name__}: {err}"))
                        ] * len(todo)
        if len(outcomes) != len(todo):
            outcomes = [Outcome.failed(TransientError(
                f"connector returned {len(outcomes)} outcomes for {len(todo)} records"))
            ] * len(todo)
        return outcomes

    def _note_request(self, outcomes: list[Outcome], probe: bool) -> bool:
        """A bulk call is one attempt for the breaker, whatever the records in it (20
        records in one refused request used to count as 20 failures in a row: the breaker
        opened after one request and probed record by record). Whether a failure counts as
        an attempt of its tasks (see :meth:`Breaker.record`)."""
        tried = [o.error for o in outcomes if o.error is not NOT_ATTEMPTED]
        if not tried:
            return True
        failures = [str(e) for e in tried if e is not None and e.transient]
        answered = len(failures) < len(tried)
        return self.breaker.record(answered=answered, error=None if answered else failures[0],
                                   probe=probe)

    def _settle(self, w: Work, o: Outcome, probe: bool,
                counted: bool | None = None) -> float | None:
        """Record one outcome. None: decided; else the time (monotonic, 0 = now) to try again.
        ``counted``: the breaker already noted the request (a bulk call), and whether its
        failure counts as an attempt."""
        w.last = o
        if o.error is NOT_ATTEMPTED:
            return 0.0
        if w.ident in self.blocked and not w.redrive:
            # an earlier event of this key went dead in this very batch (a bulk connector)
            self.recorder.record(w, "pending", error=PARKED)
            return None
        policy = self.route.retry
        err = o.error
        if err is None or not err.transient:
            if counted is None:
                self.breaker.record(answered=True, probe=probe)
            w.attempts += 1
            if err is None:
                self.recorder.record(w, "succeeded", outcome=o)
                self._commit_latency(w)
            else:
                self._dead(w, err, outcome=o)
            return None
        counts = (self.breaker.record(answered=False, error=str(err), probe=probe)
                  if counted is None else counted)
        throttled = isinstance(err, Backpressure)
        if counts and not throttled:
            w.attempts += 1
            if w.attempts >= policy.max_attempts:
                if self.breaker.silent_since(w.answers_mark, str(err)):
                    # the target answered nothing on this route since this task's first
                    # attempt here: it looks down rather than refusing this event (the breaker
                    # is open now); not counted
                    w.attempts -= 1
                else:
                    self._dead(w, TerminalError(f"gave up after {w.attempts} attempts: "
                                                f"{err}"), outcome=o)
                    return None
        self.recorder.record(w, "retrying", error=str(err), outcome=o)
        self.metrics.failed("transient")
        self.metrics.retried()
        delay = policy.delay(max(1, w.attempts), self.rnd.random())
        if isinstance(err, Backpressure) and err.retry_after is not None:
            delay = max(delay, min(err.retry_after, policy.backoff_max_s))
        return time.monotonic() + delay

    def _commit_latency(self, w: Work) -> None:
        """Database commit (``source.ts_ms``) to accepted delivery of one event."""
        value = w.event.value if w.event is not None else {}
        ts_ms = (value.get("source") or {}).get("ts_ms") or value.get("ts_ms")
        if isinstance(ts_ms, int | float):
            self.metrics.latency_since(ts_ms)

    def _dead(self, w: Work, err: DxError, *, outcome: Outcome | None = None) -> None:
        """Dead-letter first (durably), then record the task; the key parks."""
        reason = str(err)
        if not isinstance(err, EventError) and w.coords() not in reason:
            reason = f"{w.coords()}: {reason}"
        if not self.ownership.current(w):
            return  # revoked: the partition's new owner decides about this event
        self.metrics.failed("terminal")
        with tracing.attached(w.headers):
            dlq = self.dead_letters.send(w, reason, err)
        if dlq is None:  # stopping before the dead letter was durable: not dead (yet)
            status = "pending" if w.redrive else "failed"
            self.recorder.record(w, status, error=f"worker stopped before dead-lettering: "
                                 f"{reason}", outcome=outcome)
            return
        if not self.ownership.current(w):
            return  # revoked while dead-lettering: not recorded (the new owner redelivers it)
        self.blocked.add(w.ident)
        self.recorder.record(w, "dead", error=reason, outcome=outcome, dlq=dlq)

    def _interrupted(self) -> None:
        """The worker stops with work undecided. A fresh event that was attempted is recorded
        ``failed`` (Kafka redelivers it: its offset is not committed); a redriven one goes back
        to ``pending`` (its offset was committed long ago: it is redriven again, its key stays
        parked). Work never attempted is left alone."""
        for q in self.keys.values():
            for w in q:
                err = w.last.error if w.last else ""
                if w.redrive and w.status is not None:
                    self.recorder.record(w, "pending", error=f"worker stopped before retrying "
                                         f"the redrive: {err}", outcome=w.last)
                elif not w.redrive and w.attempts:
                    self.recorder.record(w, "failed", error=f"worker stopped before retrying: "
                                         f"{err}", outcome=w.last)
        self.keys.clear()

    # -- redrive -----------------------------------------------------------------------------------

    def _redrive(self, key: KeyId) -> None:
        """Queue a key's pending tasks (in arrival order) at the front of its queue; when the
        last of them is decided the key is read again, and unparked once nothing is left."""
        self.redrive_queued.discard(key)
        if self._redriving(key):
            return
        try:
            self.writer.flush()
            rows = self.store.pending_of_key(self.route.name, key, self.ownership.owned())
            if not rows:
                if not self.store.has_dead(self.route.name, key):
                    self.blocked.discard(key)
                return
        except (DxError, psycopg.Error) as err:  # the next redrive poll asks again
            log.warning("route %s: redrive of key %s postponed: %s", self.route.name, key, err)
            with contextlib.suppress(DxError):
                self.store.reconnect()
            return
        works = []
        try:
            for r in rows:
                tp = (r["topic"], r["partition"])
                generation = self.ownership.admit(tp)
                if generation is None:  # revoked since the read: its new owner redrives it (and
                    return  # none of the key's later tasks may pass this one)
                raw_key = bytes(r["raw_key"]) if r["raw_key"] is not None else None
                works.append(Work(topic=tp[0], partition=tp[1], offset=r["offset"],
                                  raw_key=raw_key, raw_value=bytes(r["raw_value"] or b""),
                                  headers=decode_headers(r["raw_headers"]),
                                  key=self.decode_key(raw_key), key_text=key[1],
                                  generation=generation,
                                  consumed_at=time.monotonic(), attempts=int(r["attempts"]),
                                  redrive=True))
        except ServiceUnavailable as err:  # the registry, for the key: the next poll asks again
            log.warning("route %s: redrive of key %s postponed: %s", self.route.name, key[1], err)
            return
        for w in reversed(works):
            self._enqueue(w, front=True)

    def _redrive_settled(self, key: KeyId, w: Work) -> None:
        """A redriven task was decided: read the key again once none of its batch is left."""
        if self._redriving(key):
            return
        if w.status in ("succeeded", "skipped") and not self.stop.is_set():
            self._redrive(key)

    def _redriving(self, key: KeyId) -> bool:
        """Whether redriven tasks of ``key`` are still queued here (in its queue, maybe backing
        off). Work of a revoked partition does not count: it is abandoned, and once its
        partition is back the key must be redriven again (a flag set when the redrive started
        stayed set forever when its work was abandoned, and the key never moved again)."""
        return any(x.redrive and self.ownership.current(x) for x in self.keys.get(key) or ())
