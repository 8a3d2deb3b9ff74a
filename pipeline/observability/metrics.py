"""The Prometheus metrics of every dx worker role.

Naming follows the Prometheus conventions operators expect: a ``dx_`` prefix, base units in the
name (``_seconds``), ``_total`` on counters, and only low-cardinality labels:

* ``role`` — ``relay``, ``sink``, ``source``, ``inbound`` (webhooks, pulls, file drops producing
  to a source route's topic), or a one-shot job: ``snapshot``, ``import``, ``export``;
* ``route`` — the route name from ``dx.yaml`` (the relay name for the relay);
* ``topic`` / ``partition`` — bounded by the topics a route reads and their partition counts;
* ``kind`` / ``reason`` — small closed sets documented on each metric.

Never label by entity key, event id, URL or error message: each distinct label value is a new time
series kept in memory by every Prometheus that scrapes us.

The metric *families* are created once per registry by :class:`DxMetrics`; the module-level
:data:`METRICS` registers them on the default registry (that is the only import-time effect, and
it is what lets ``prometheus_client`` add process and GC metrics next to ours). Workers do not
touch families directly: they bind their labels once with :meth:`DxMetrics.worker` or
:meth:`DxMetrics.relay` and call small typed methods, so a typo in a label name cannot create a
new series at 3 a.m.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info

Role = Literal["relay", "sink", "source", "inbound", "snapshot", "import", "export"]
FailureKind = Literal["transient", "terminal"]
SkipReason = Literal["filtered", "origin", "duplicate", "tombstone"]

#: Batch sizes are counts of events: 1 (trickle) up to the relay's maximum batch of 100 000.
BATCH_SIZE_BUCKETS: tuple[float, ...] = (
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000, 10_000, 25_000, 100_000,
)
#: Seconds for one call or one batch: a local Kafka flush is milliseconds, an HTTP target seconds.
DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)
#: End-to-end seconds from the database commit to delivery; includes retries, so it reaches hours.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14_400,
)


class DxMetrics:
    """Every dx metric family, registered on one registry.

    Tests create their own with ``DxMetrics(CollectorRegistry())`` so counters start at zero and
    nothing leaks between tests; workers use :data:`METRICS`.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        worker = ["role", "route"]
        self.build_info = Info(
            "dx_build", "dx version running in this process", registry=registry)
        self.events_received = Counter(
            "dx_events_received_total",
            "Events a worker took in: outbox rows read (relay), records consumed (sink, source)",
            [*worker, "topic"], registry=registry)
        self.events_delivered = Counter(
            "dx_events_delivered_total",
            "Events a worker completed: records acknowledged by Kafka (relay), deliveries "
            "accepted by the target (sink), rows applied to PostgreSQL (source)",
            [*worker, "topic"], registry=registry)
        self.events_skipped = Counter(
            "dx_events_skipped_total",
            "Events deliberately not delivered; reason: filtered, origin (loop prevention), "
            "duplicate (already applied), tombstone",
            [*worker, "reason"], registry=registry)
        self.failures = Counter(
            "dx_event_failures_total",
            "Failed attempts; kind: transient (will be retried) or terminal (dead-lettered)",
            [*worker, "kind"], registry=registry)
        self.retries = Counter(
            "dx_event_retries_total",
            "Attempts repeated after a transient failure", worker, registry=registry)
        self.dead_letters = Counter(
            "dx_dead_letters_total",
            "Events given up on and written to the dead-letter topic", worker, registry=registry)
        self.consumer_lag = Gauge(
            "dx_consumer_lag_messages",
            "Messages between the group's committed offset and the partition's high watermark",
            [*worker, "topic", "partition"], registry=registry)
        self.batch_size = Histogram(
            "dx_batch_size", "Events per processed batch", worker,
            buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.batch_duration = Histogram(
            "dx_batch_duration_seconds",
            "Seconds to process one batch, from the first event to the committed offset/cursor",
            worker, buckets=DURATION_BUCKETS, registry=registry)
        self.call_duration = Histogram(
            "dx_target_call_duration_seconds",
            "Seconds of one call to a target system (HTTP request, SQL statement, file write)",
            worker, buckets=DURATION_BUCKETS, registry=registry)
        self.end_to_end = Histogram(
            "dx_event_latency_seconds",
            "Seconds from the database commit (or the inbound event time) to delivery",
            worker, buckets=LATENCY_BUCKETS, registry=registry)
        self.relay_backlog = Gauge(
            "dx_relay_backlog_events", "Outbox rows not yet relayed to Kafka", ["relay"],
            registry=registry)
        self.relay_oldest_age = Gauge(
            "dx_relay_oldest_pending_age_seconds",
            "Age of the oldest outbox row not yet relayed (0 when the outbox is empty)",
            ["relay"], registry=registry)
        self.relay_blocking_tx_age = Gauge(
            "dx_relay_blocking_transaction_age_seconds",
            "Age of the oldest open transaction holding back the commit frontier (0 when none)",
            ["relay"], registry=registry)
        self.relay_inactive_triggers = Gauge(
            "dx_capture_inactive_triggers",
            "dx triggers in the relay's database that do not fire for every write (disabled, "
            "or skipped under session_replication_role = replica): writes they miss are lost",
            ["relay"], registry=registry)
        self.slot_retained = Gauge(
            "dx_capture_slot_retained_bytes",
            "WAL bytes PostgreSQL keeps for the relay's replication slot (logical capture): "
            "grows while no relay reads it, until the disk or max_slot_wal_keep_size is hit",
            ["relay"], registry=registry)
        self.slot_confirm_age = Gauge(
            "dx_capture_slot_confirm_age_seconds",
            "Seconds since the relay last confirmed its replication slot (logical capture)",
            ["relay"], registry=registry)
        self.relay_active = Gauge(
            "dx_relay_active",
            "1 while this process holds the relay lease, 0 while it is a hot standby",
            ["relay"], registry=registry)

    def set_build(self, version: str | None = None) -> None:
        """Publish the running version (one ``dx_build_info`` series) so dashboards can tell
        which release a misbehaving pod runs; defaults to the installed distribution's version."""
        if version is None:
            try:
                version = importlib.metadata.version("dx")
            except importlib.metadata.PackageNotFoundError:
                version = "unknown"
        self.build_info.info({"version": version})

    def worker(self, role: Role, route: str) -> WorkerMetrics:
        """Metrics bound to one worker: ``role`` and ``route`` are fixed for its lifetime."""
        return WorkerMetrics(self, role, route)

    def relay(self, name: str) -> RelayMetrics:
        """The relay's own gauges plus the worker metrics with ``role="relay"``."""
        return RelayMetrics(self, name)


@dataclass(frozen=True)
class WorkerMetrics:
    """The counters and histograms of one worker, labels already bound.

    Call the method when the thing has happened (after the ack, after the commit), not before:
    a counter that runs ahead of the offsets lies after a crash.
    """

    metrics: DxMetrics
    role: Role
    route: str

    def received(self, topic: str, n: int = 1) -> None:
        """``n`` events taken in from ``topic`` (the outbox table name for the relay)."""
        self.metrics.events_received.labels(self.role, self.route, topic).inc(n)

    def delivered(self, topic: str, n: int = 1) -> None:
        """``n`` events completed: acknowledged, accepted by the target, or applied."""
        self.metrics.events_delivered.labels(self.role, self.route, topic).inc(n)

    def skipped(self, reason: SkipReason, n: int = 1) -> None:
        """``n`` events deliberately not delivered (they are ``skipped`` tasks)."""
        self.metrics.events_skipped.labels(self.role, self.route, reason).inc(n)

    def failed(self, kind: FailureKind, n: int = 1) -> None:
        """An attempt failed; ``transient`` ones are retried, ``terminal`` ones dead-lettered."""
        self.metrics.failures.labels(self.role, self.route, kind).inc(n)

    def retried(self, n: int = 1) -> None:
        """An attempt is about to be repeated after a transient failure."""
        self.metrics.retries.labels(self.role, self.route).inc(n)

    def dead_lettered(self, n: int = 1) -> None:
        """Events written to the dead-letter topic (the task is ``dead``)."""
        self.metrics.dead_letters.labels(self.role, self.route).inc(n)

    def lag(self, topic: str, partition: int, messages: int) -> None:
        """Consumer lag of one assigned partition (set it on every lag check, even to 0)."""
        self.metrics.consumer_lag.labels(
            self.role, self.route, topic, str(partition)).set(max(0, messages))

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop the lag series of a partition revoked in a rebalance, so it does not freeze."""
        with suppress(KeyError):
            self.metrics.consumer_lag.remove(self.role, self.route, topic, str(partition))

    def batch(self, size: int, seconds: float) -> None:
        """One batch of ``size`` events done in ``seconds``."""
        self.metrics.batch_size.labels(self.role, self.route).observe(size)
        self.metrics.batch_duration.labels(self.role, self.route).observe(seconds)

    def latency(self, seconds: float) -> None:
        """End-to-end latency of one event (commit or inbound time to delivery)."""
        self.metrics.end_to_end.labels(self.role, self.route).observe(max(0.0, seconds))

    def latency_since(self, epoch_ms: int | float, n: int = 1) -> None:
        """End-to-end latency from an event timestamp in epoch milliseconds (``source.ts_ms``)."""
        seconds = max(0.0, time.time() - epoch_ms / 1000.0)
        hist = self.metrics.end_to_end.labels(self.role, self.route)
        for _ in range(n):
            hist.observe(seconds)

    @contextmanager
    def timed_call(self) -> Iterator[None]:
        """Time one call to the target, failed or not: ``with m.timed_call(): send(...)``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.metrics.call_duration.labels(self.role, self.route).observe(
                time.perf_counter() - start)

    @contextmanager
    def timed_batch(self, size: int) -> Iterator[None]:
        """Time one batch and record its size when it completes without raising."""
        start = time.perf_counter()
        yield
        self.batch(size, time.perf_counter() - start)


class RelayMetrics(WorkerMetrics):
    """The relay: worker metrics (``role="relay"``, ``route`` = relay name) plus its gauges."""

    def __init__(self, metrics: DxMetrics, name: str) -> None:
        super().__init__(metrics, "relay", name)

    def backlog(self, events: int, oldest_age_s: float) -> None:
        """Outbox rows pending and the age of the oldest; both 0 when the outbox is empty."""
        self.metrics.relay_backlog.labels(self.route).set(max(0, events))
        self.metrics.relay_oldest_age.labels(self.route).set(max(0.0, oldest_age_s))

    def blocking_transaction(self, age_s: float) -> None:
        """Age of the open transaction holding the frontier back (0 when nothing blocks)."""
        self.metrics.relay_blocking_tx_age.labels(self.route).set(max(0.0, age_s))

    def inactive_triggers(self, count: int) -> None:
        """dx triggers that do not fire for every write (0 when capture sees everything)."""
        self.metrics.relay_inactive_triggers.labels(self.route).set(count)

    def slot(self, retained_bytes: int, confirm_age_s: float) -> None:
        """The replication slot's retained WAL and the age of its last confirm (logical
        capture). Database facts, so active relay and standbys export the same values: use
        ``max`` over replicas, not ``sum``."""
        self.metrics.slot_retained.labels(self.route).set(max(0, retained_bytes))
        self.metrics.slot_confirm_age.labels(self.route).set(max(0.0, confirm_age_s))

    def active(self, is_active: bool) -> None:
        """1 while holding the lease, 0 as a hot standby (alert when the sum is not 1)."""
        self.metrics.relay_active.labels(self.route).set(1 if is_active else 0)


#: The families on the default registry: what ``/metrics`` of a worker serves.
METRICS = DxMetrics(REGISTRY)
