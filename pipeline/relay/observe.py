"""What the relay tells operators while it runs: Prometheus metrics and the probe state.

:class:`Relay` calls a :class:`RelayHooks` at four points (state changes, every loop turn, every
delivered batch, every failed attempt); the base class does nothing, so the relay works the same
without observability. :class:`RelayObserver` is the real one ``dx relay`` installs:

* ``dx_relay_active`` and ``/readyz``: ready while holding the lease, a declared standby while
  waiting for it (``/readyz?standby=ok`` is 200 for a standby), not ready while starting/stopping;
* ``/healthz`` heartbeat on every loop turn, in both the active and the standby loop;
* per batch: ``dx_events_received_total`` (outbox rows, by entity), ``dx_events_delivered_total``
  (records acknowledged by Kafka, by topic), ``dx_batch_size``/``dx_batch_duration_seconds``,
  ``dx_event_latency_seconds`` (database commit to Kafka acknowledgement, per row);
* every few seconds while active, on a connection of its own: ``dx_relay_backlog_events``,
  ``dx_relay_oldest_pending_age_seconds``, ``dx_relay_blocking_transaction_age_seconds`` and
  ``dx_capture_inactive_triggers`` (dx triggers that miss writes: disabled, or skipped under
  ``session_replication_role = replica``; each one is also a warning line and part of the
  ``/readyz`` reason).
  A standby exports none of these, so summing over replicas stays right;
* in logical mode, active and standby alike (the same database facts: ``max`` over replicas):
  ``dx_capture_slot_retained_bytes`` and ``dx_capture_slot_confirm_age_seconds``, so the WAL a
  slow or stuck relay makes PostgreSQL keep is on the dashboard before the disk fills. Once no
  relay runs at all, ``dx alerts run``'s ``replication_slot`` rule reads the same figures.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from typing import Any

import psycopg

from pipeline.capture import logical
from pipeline.capture.install import inactive_triggers
from pipeline.config import DxConfig
from pipeline.db import connect
from pipeline.errors import DxError
from pipeline.observability.metrics import METRICS, DxMetrics
from pipeline.observability.server import WorkerServer
from pipeline.relay.encoder import Record
from pipeline.relay.reader import OutboxRow
from pipeline.status import open_transactions, outbox_backlog

log = logging.getLogger(__name__)


class RelayHooks:
    """Called by the relay; every method is a no-op here."""

    def state(self, state: str) -> None:
        """``starting``, ``standby (active: ...)``, ``active``, ``stopping``, ``stopped``."""

    def tick(self) -> None:
        """One turn of the active loop (or of the standby wait)."""

    def batch(self, rows: list[OutboxRow], records: list[Record], seconds: float) -> None:
        """A batch Kafka acknowledged (and whose cursor is stored)."""

    def retry(self) -> None:
        """A batch attempt failed transiently and will be repeated."""


def pause(stop: threading.Event, seconds: float, hooks: RelayHooks,
          beat_s: float = 1.0) -> bool:
    """Wait ``seconds`` (a retry backoff) while the heartbeat goes on, so a liveness probe does
    not restart a relay that is patiently retrying within its budget; True when stopped."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        hooks.tick()
        if stop.wait(min(beat_s, left)):
            return True
    return stop.is_set()


class RelayObserver(RelayHooks):
    def __init__(self, config: DxConfig, server: WorkerServer | None = None, *,
                 metrics: DxMetrics = METRICS, sample_every_s: float = 5.0) -> None:
        self.name = config.relay.name
        self.url = config.database.url.get_secret_value()
        self.server = server if server is not None else WorkerServer(0)
        self.metrics = metrics.relay(self.name)
        self.latency = metrics.end_to_end.labels("relay", self.name)
        self.sample_every_s = sample_every_s
        self._next_sample = 0.0
        self._conn: psycopg.Connection[Any] | None = None
        self._capture_problems: tuple[str, ...] = ()
        self.active = False

    def state(self, state: str) -> None:
        self.server.heartbeat()
        self.active = state == "active"
        self.metrics.active(self.active)
        if self.active:
            self.server.set_ready(True, self._ready_reason())
        elif state.startswith("standby"):
            self.server.set_standby(state)
            self._maybe_sample()
        else:
            self.server.set_ready(False, state)
            if state == "stopped":
                self.close()

    def tick(self) -> None:
        self.server.heartbeat()
        self._maybe_sample()

    def _maybe_sample(self) -> None:
        now = time.monotonic()
        if now >= self._next_sample:
            self._next_sample = now + self.sample_every_s
            self.sample()

    def batch(self, rows: list[OutboxRow], records: list[Record], seconds: float) -> None:
        for entity, n in Counter(r.entity for r in rows).items():
            self.metrics.received(entity, n)
        for topic, n in Counter(r.topic for r in records).items():
            self.metrics.delivered(topic, n)
        self.metrics.batch(len(rows), seconds)
        now = time.time()
        for r in rows:
            self.latency.observe(max(0.0, now - r.committed_at.timestamp()))

    def retry(self) -> None:
        self.metrics.failed("transient")
        self.metrics.retried()

    def sample(self) -> None:
        """The replication slot's figures (logical mode); while active also backlog, oldest
        pending age and blocking transaction age from the database."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self.url, autocommit=True, application_name=(
                    f"dx-relay:{self.name}:{socket.gethostname()}:{os.getpid()}:metrics"))
            slot = (logical.slot_info(self._conn)
                    if logical.installed_mode(self._conn) == "logical" else None)
            if slot is not None and slot.retained_bytes is not None:
                self.metrics.slot(slot.retained_bytes, slot.confirmed_age_s or 0.0)
            if not self.active:
                return
            events, oldest = outbox_backlog(self._conn)
            blocking = [t.age_s for t in open_transactions(self._conn, 0)
                        if t.holds_captured_changes]
            inactive = inactive_triggers(self._conn)
        except (DxError, psycopg.Error) as err:
            log.warning("relay %s: backlog sample failed: %s", self.name, err)
            self.close()
            return
        self.metrics.backlog(events, oldest or 0.0)
        self.metrics.blocking_transaction(max(blocking, default=0.0))
        self.metrics.inactive_triggers(len(inactive))
        problems = tuple(t.problem() for t in inactive)
        if problems != self._capture_problems:
            self._capture_problems = problems
            for line in problems:
                log.warning("relay %s: capture incomplete: %s", self.name, line)
            if self.active:
                self.server.set_ready(True, self._ready_reason())

    def _ready_reason(self) -> str:
        """Still ready (the relay publishes what is captured), but /readyz says what is not."""
        if not self._capture_problems:
            return "holding the relay lease"
        first, more = self._capture_problems[0], len(self._capture_problems) - 1
        return (f"holding the relay lease; capture incomplete: {first}"
                + (f" (and {more} more)" if more else ""))

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
