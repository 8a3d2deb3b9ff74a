"""What ``dx status`` reports: the outbox and the relay (backlog, oldest pending change, who holds
the lease, open transactions that hold captured changes back), and every route (consumer lag from
Kafka, workers in its group, task counts by status, dead letters), with the problems that make the
exchange unhealthy.

Reading is defensive: a database where a table does not exist yet (``dx init`` not run, no worker
started) reports nothing for it, and an unreachable Kafka turns into one problem line with the lag
left unknown, never an exception. Everything is scoped to the current database (one PostgreSQL
server often hosts several shops, or several test databases).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import psycopg
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

from pipeline.capture import logical
from pipeline.capture.ddl import LEASE_KEY
from pipeline.config import DxConfig
from pipeline.observability.logging import KAFKA_LOG
from pipeline.routes.pause import paused_routes
from pipeline.tasks import health
from pipeline.tasks.query import Counts, counts

RouteKind = Literal["sink", "source", "unconfigured"]
#: Task statuses in the order ``dx status`` shows them (dead last, it is what needs a person).
STATUS_ORDER = ("pending", "retrying", "failed", "succeeded", "skipped", "dead")


@dataclass
class Thresholds:
    """When ``dx status`` calls the exchange unhealthy (each is a CLI option)."""

    long_txn_s: float = 60.0          # an open transaction holding captured changes this long
    backlog_age_s: float = 300.0      # the oldest committed change not relayed yet
    max_lag: int = 10_000             # messages a route may be behind (a few batches in flight)
    max_dead: int = 0                 # dead tasks a route may have
    kafka_timeout_s: float = 5.0      # per Kafka request; the lag is unknown after that


# -- outbox and relay ---------------------------------------------------------------------------


@dataclass
class OpenTransaction:
    pid: int
    age_s: float
    state: str
    application: str
    query: str
    holds_captured_changes: bool


@dataclass
class RelayStatus:
    backlog: int = 0
    oldest_pending_age_s: float | None = None
    committed_not_relayed: int = 0
    relay_active: str | None = None
    relay_standbys: int = 0
    last_delivery_age_s: float | None = None
    open_transactions: list[OpenTransaction] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    capture_mode: str = "trigger"  # as installed (logical: the publication exists)
    slot: dict[str, Any] | None = None  # logical mode: the replication slot's state

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def table_exists(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])


def outbox_backlog(conn: psycopg.Connection[Any]) -> tuple[int, float | None]:
    """Outbox rows waiting (committed; the relay deletes what it delivered) and the age of the
    oldest in seconds (None when empty)."""
    row = conn.execute(
        "SELECT count(*), extract(epoch FROM now() - min(created_at)) FROM dx.outbox"
    ).fetchone()
    assert row is not None
    return int(row[0]), float(row[1]) if row[1] is not None else None


def open_transactions(conn: psycopg.Connection[Any],
                      older_than_s: float) -> list[OpenTransaction]:
    """Transactions of this database open longer than ``older_than_s``, oldest first; those that
    wrote to ``dx.outbox`` hold captured changes (and every later commit) back from Kafka."""
    rows = conn.execute(
        """
        SELECT a.pid, extract(epoch FROM now() - a.xact_start), a.state, a.application_name,
               left(a.query, 200),
               EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid
                       AND l.database = a.datid AND l.relation = 'dx.outbox'::regclass
                       AND l.mode = 'RowExclusiveLock')
        FROM pg_stat_activity a
        WHERE a.xact_start IS NOT NULL AND a.pid <> pg_backend_pid()
          AND a.datname = current_database() AND a.backend_type = 'client backend'
          AND now() - a.xact_start > make_interval(secs => %s)
        ORDER BY a.xact_start
        """, (older_than_s,)).fetchall()
    return [OpenTransaction(int(pid), float(age), str(state), str(app), str(query),
                            bool(captured))
            for pid, age, state, app, query, captured in rows]


def relay_status(conn: psycopg.Connection[Any], relay_name: str, *,
                 long_txn_s: float = 60.0, backlog_age_s: float = 300.0) -> RelayStatus:
    st = RelayStatus()
    if not table_exists(conn, "dx.outbox"):
        st.problems.append("dx is not initialised in this database (run 'dx init')")
        conn.commit()
        return st
    st.backlog, st.oldest_pending_age_s = outbox_backlog(conn)
    row = conn.execute(
        "SELECT count(*) FROM dx.outbox o JOIN dx.txn t ON t.xid = o.xid").fetchone()
    st.committed_not_relayed = int(row[0]) if row else 0
    holders = conn.execute(
        "SELECT a.application_name, l.granted FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.classid = %s AND l.objid = %s AND l.objsubid = 2",
        LEASE_KEY).fetchall()
    st.relay_active = next((str(h[0]) for h in holders if h[1]), None)
    # a relay process's main connection is named dx-relay:<name>:<host>:<pid>; its helper
    # connections add one more ':<purpose>'
    row = conn.execute(
        "SELECT count(DISTINCT application_name) FROM pg_stat_activity "
        "WHERE datname = current_database() "
        "AND application_name LIKE %s AND application_name NOT LIKE '%%:%%:%%:%%:%%'",
        (f"dx-relay:{relay_name}:%",)).fetchone()
    st.relay_standbys = max(0, (int(row[0]) if row else 0) - (1 if st.relay_active else 0))
    row = conn.execute("SELECT extract(epoch FROM now() - updated_at) FROM dx.relay_state "
                       "WHERE name = %s", (relay_name,)).fetchone()
    st.last_delivery_age_s = float(row[0]) if row else None
    st.open_transactions = open_transactions(conn, long_txn_s)
    conn.commit()
    for t in st.open_transactions:
        if t.holds_captured_changes:
            st.problems.append(
                f"transaction pid {t.pid} ({t.application or 'no application_name'}) has held "
                f"captured changes for {t.age_s:.0f}s ({t.state}); they reach Kafka only when "
                f"it commits: {t.query[:80]!r}")
    if st.oldest_pending_age_s is not None and st.oldest_pending_age_s > backlog_age_s \
            and st.committed_not_relayed:
        st.problems.append(f"outbox backlog is {st.oldest_pending_age_s:.0f}s old "
                           f"({st.committed_not_relayed} committed events not relayed)")
    if st.committed_not_relayed and st.relay_active is None:
        st.problems.append("no relay is active and committed events are waiting")
    _slot_status(conn, st, backlog_age_s)
    return st


def _slot_status(conn: psycopg.Connection[Any], st: RelayStatus, backlog_age_s: float) -> None:
    """Logical mode: the slot keeps WAL until the relay confirms it; say how much and since
    when, and that a missing or invalidated slot needs the runbook."""
    st.capture_mode = logical.installed_mode(conn)
    if st.capture_mode != "logical":
        conn.commit()
        return
    info = logical.slot_info(conn)
    conn.commit()
    if info is None:
        st.problems.append(f"replication slot {logical.current_slot(conn)} is missing: see the "
                           "README runbook 'lost replication slot'")
        return
    st.slot = asdict(info)
    if info.lost:
        st.problems.append(f"replication slot {info.name} was invalidated (WAL it needed is "
                           "gone): see the README runbook 'lost replication slot'")
    elif info.unconfirmed_bytes and info.confirmed_age_s is not None \
            and info.confirmed_age_s > backlog_age_s:
        st.problems.append(f"replication slot {info.name} not confirmed for "
                           f"{info.confirmed_age_s:.0f}s; it retains {info.retained_bytes} bytes "
                           "of WAL (is the relay running?)")


# -- routes -------------------------------------------------------------------------------------


@dataclass
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # next offset the route will read; None: nothing committed yet
    high: int
    lag: int


@dataclass
class RouteStatus:
    name: str
    kind: RouteKind
    group: str | None
    topics: list[str]
    lag: int | None = None  # None: unknown (Kafka unreachable or no topic yet)
    members: int | None = None  # workers in the consumer group; None: unknown
    partitions: list[PartitionLag] = field(default_factory=list)
    tasks: dict[str, int] = field(default_factory=dict)
    note: str | None = None
    incoming: list[IncomingStatus] = field(default_factory=list)  # source routes' inbound kinds
    paused: bool = False  # an operator paused it ('dx sink|source pause')
    estimated: list[str] = field(default_factory=list)  # statuses whose count is an estimate

    @property
    def dead(self) -> int:
        return self.tasks.get("dead", 0)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "dead": self.dead}


@dataclass
class IncomingStatus:
    """One inbound kind of a source route (``dx.inbound_state``): webhook, pull or files."""

    kind: str
    cursor: str | None
    last_run_age_s: float | None
    last_ok_age_s: float | None
    pages: int
    entities: int
    requests: int
    refused: int
    errors: int
    files_done: int
    files_failed: int
    last_error: str | None
    failing: bool  # the last run failed (its error is newer than the last success)


def incoming(conn: psycopg.Connection[Any]) -> dict[str, list[IncomingStatus]]:
    """Inbound kinds by route ({} before any inbound command ran)."""
    if not table_exists(conn, "dx.inbound_state"):
        conn.commit()
        return {}
    out: dict[str, list[IncomingStatus]] = {}
    for row in conn.execute(
            "SELECT route, kind, cursor, extract(epoch FROM now() - last_run_at), "
            "extract(epoch FROM now() - last_ok_at), pages, entities, requests, refused, "
            "errors, files_done, files_failed, last_error, "
            "last_error_at IS NOT NULL AND (last_ok_at IS NULL OR last_error_at > last_ok_at) "
            "FROM dx.inbound_state ORDER BY route, kind"):
        n = [int(v) for v in row[5:12]]
        out.setdefault(str(row[0]), []).append(IncomingStatus(
            kind=str(row[1]), cursor=row[2],
            last_run_age_s=None if row[3] is None else float(row[3]),
            last_ok_age_s=None if row[4] is None else float(row[4]), pages=n[0], entities=n[1],
            requests=n[2], refused=n[3], errors=n[4], files_done=n[5], files_failed=n[6],
            last_error=row[12], failing=bool(row[13])))
    conn.commit()
    return out


def task_counts(conn: psycopg.Connection[Any]) -> Counts:
    """Tasks by route and status (none when the task table does not exist yet); big resolved
    counts are estimates (``Counts.estimated``)."""
    return counts(conn)


def source_offsets(conn: psycopg.Connection[Any]) -> dict[tuple[str, str, int], int]:
    """``dx.source_offsets`` as {(route, topic, partition): next offset} ({} when missing)."""
    if not table_exists(conn, "dx.source_offsets"):
        conn.commit()
        return {}
    rows = conn.execute(
        "SELECT route, topic, partition, next_offset FROM dx.source_offsets").fetchall()
    conn.commit()
    return {(str(r), str(t), int(p)): int(o) for r, t, p, o in rows}


def configured_routes(cfg: DxConfig) -> list[RouteStatus]:
    return ([RouteStatus(r.name, "sink", r.consumer_group, list(r.topics)) for r in cfg.sinks]
            + [RouteStatus(r.name, "source", r.group, [r.topic]) for r in cfg.sources])


class KafkaLag:
    """Committed offsets against high watermarks, for many groups in a few admin requests."""

    def __init__(self, cfg: DxConfig, timeout_s: float = 5.0) -> None:
        self.cfg = cfg
        self.timeout_s = timeout_s
        self.conf: dict[str, Any] = cfg.kafka.librdkafka()
        self.admin = AdminClient(self.conf, logger=KAFKA_LOG)

    def partitions(self, topics: Iterable[str]) -> dict[str, list[int]]:
        """Partitions of the topics that exist. Raises KafkaException when unreachable."""
        md = self.admin.list_topics(timeout=self.timeout_s)
        return {t: sorted(md.topics[t].partitions) for t in topics
                if t in md.topics and md.topics[t].error is None}

    def watermarks(self, tps: list[TopicPartition]) -> dict[tuple[str, int], tuple[int, int]]:
        """(low, high) per partition."""
        if not tps:
            return {}
        found: dict[tuple[str, int], list[int]] = {}
        for spec in (OffsetSpec.earliest(), OffsetSpec.latest()):  # type: ignore[no-untyped-call]
            futures = self.admin.list_offsets({tp: spec for tp in tps},
                                              request_timeout=self.timeout_s)
            for tp, fut in futures.items():
                found.setdefault((tp.topic, tp.partition), []).append(
                    int(fut.result(self.timeout_s).offset))
        return {k: (v[0], v[1]) for k, v in found.items()}

    def committed(self, group: str, tps: list[TopicPartition]) -> dict[tuple[str, int], int]:
        """The group's committed offsets (partitions without one are left out)."""
        if not tps:
            return {}
        futures = self.admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, tps)], request_timeout=self.timeout_s)
        result = futures[group].result(self.timeout_s)
        return {(tp.topic, tp.partition): int(tp.offset)
                for tp in result.topic_partitions if tp.offset >= 0}

    def members(self, groups: list[str]) -> dict[str, int]:
        """Members per consumer group (0 for an empty or unknown group)."""
        if not groups:
            return {}
        out: dict[str, int] = {}
        for group, fut in self.admin.describe_consumer_groups(
                groups, request_timeout=self.timeout_s).items():
            try:
                out[group] = len(fut.result(self.timeout_s).members)
            except KafkaException:
                out[group] = 0
        return out

    def only_markers(self, behind: set[tuple[str, int, int]]) -> set[tuple[str, int, int]]:
        """Of (topic, partition, offset) a little behind the high watermark, those from where
        nothing but transaction markers (or aborted records) is left: a relay in exactly-once
        mode ends every transaction with a marker that takes an offset, so a caught-up consumer
        stays one offset short. Read with read_committed from the offset to find out."""
        by_tp: dict[tuple[str, int], int] = {}
        for t, p, o in behind:  # empty from the lowest offset is empty from the higher ones
            by_tp[(t, p)] = min(o, by_tp.get((t, p), o))
        if not by_tp:
            return set()
        c = Consumer({**self.conf, "group.id": f"dx-status-{time.time_ns()}",
                      "enable.auto.commit": False, "enable.partition.eof": True,
                      "isolation.level": "read_committed"}, logger=KAFKA_LOG)
        left = set(by_tp)
        empty: set[tuple[str, int, int]] = set()
        try:
            c.assign([TopicPartition(t, p, o) for (t, p), o in by_tp.items()])
            deadline = time.monotonic() + self.timeout_s
            while left and time.monotonic() < deadline:
                msg = c.poll(0.2)
                if msg is None:
                    continue
                key = (str(msg.topic()), int(msg.partition() or 0))
                err = msg.error()
                if err is not None and err.code() != KafkaError._PARTITION_EOF:
                    continue
                if key in left:
                    left.discard(key)
                    if err is not None:  # EOF before any record: only markers were left
                        empty |= {b for b in behind if b[:2] == key}
        finally:
            c.close()
        return empty

    def fill(self, routes: list[RouteStatus], stored: dict[tuple[str, str, int], int]) -> None:
        """Set lag, partitions and members of every configured route. Sinks: the group's
        committed offsets. Sources: ``stored`` (dx.source_offsets, the truth for exactly-once);
        a partition without an offset starts at the route's ``start``."""
        configured = [r for r in routes if r.kind != "unconfigured"]
        parts = self.partitions({t for r in configured for t in r.topics})
        tps = [TopicPartition(t, p) for t, ps in parts.items() for p in ps]
        marks = self.watermarks(tps)
        start = {r.name: r.start for r in self.cfg.sources}
        for route in configured:
            mine = [TopicPartition(t, p) for t in route.topics for p in parts.get(t, [])]
            missing = [t for t in route.topics if t not in parts]
            if missing:
                route.note = f"topic not created yet: {', '.join(missing)}"
            if route.kind == "sink":
                committed = self.committed(route.group or "", mine)
            else:
                committed = {(t, p): o for (r, t, p), o in stored.items() if r == route.name}
            for tp in mine:
                low, high = marks[(tp.topic, tp.partition)]
                have = committed.get((tp.topic, tp.partition))
                begin = have if have is not None else \
                    high if start.get(route.name) == "latest" else low
                route.partitions.append(PartitionLag(tp.topic, tp.partition, have, high,
                                                     max(0, high - max(begin, low))))
        small = {(p.topic, p.partition, p.committed) for r in configured
                 for p in r.partitions if 0 < p.lag <= 50 and p.committed is not None}
        caught_up = self.only_markers(small)
        for route in configured:
            for p in route.partitions:
                if (p.topic, p.partition, p.committed) in caught_up:
                    p.lag = 0
            route.lag = sum(p.lag for p in route.partitions) if route.partitions or \
                not route.note else None
        members = self.members(sorted({r.group for r in configured if r.group}))
        for route in configured:
            route.members = members.get(route.group or "")


@dataclass
class Status:
    relay: RelayStatus
    routes: list[RouteStatus]
    kafka_error: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "problems": self.problems,
                "relay": self.relay.to_json(),
                "kafka": {"reachable": self.kafka_error is None, "error": self.kafka_error},
                "routes": [r.to_json() for r in self.routes]}


def collect(conn: psycopg.Connection[Any], cfg: DxConfig,
            limits: Thresholds | None = None) -> Status:
    """Everything ``dx status`` shows, with the problems found against ``limits``."""
    limits = limits or Thresholds()
    relay = relay_status(conn, cfg.relay.name, long_txn_s=limits.long_txn_s,
                         backlog_age_s=limits.backlog_age_s)
    routes = configured_routes(cfg)
    found = task_counts(conn)
    counts = found.by_route
    kinds = incoming(conn)
    for route in routes:
        route.tasks = counts.pop(route.name, {})
        if route.kind == "source":
            route.incoming = kinds.get(route.name, [])
    routes += [RouteStatus(name, "unconfigured", None, [], tasks=c)
               for name, c in sorted(counts.items())]
    paused = paused_routes(conn)
    conn.commit()
    for route in routes:
        route.paused = (route.kind, route.name) in paused
        route.estimated = sorted(s for r, s in found.estimated if r == route.name)
    st = Status(relay, routes, problems=list(relay.problems))
    if any(r.kind != "unconfigured" for r in routes):
        try:
            KafkaLag(cfg, limits.kafka_timeout_s).fill(routes, source_offsets(conn))
        except KafkaException as err:
            kerr = err.args[0] if err.args else err
            detail = kerr.str() if isinstance(kerr, KafkaError) else str(kerr)
            st.kafka_error = f"kafka unreachable at {cfg.kafka.bootstrap_servers}: {detail}"
            st.problems.append(f"{st.kafka_error}; consumer lag unknown")
    for r in routes:
        st.problems.extend(route_problems(r, limits))
    down = health.read(conn)  # a sink worker's circuit breaker: "target down since ..."
    for r in routes:
        h = down.get(r.name)
        if r.kind == "sink" and h is not None and h.target_down:
            r.note = f"{r.note}; {h.text()}" if r.note else h.text()
            st.problems.append(f"route {r.name} (sink): {h.text()}")
    return st


def route_problems(r: RouteStatus, limits: Thresholds) -> list[str]:
    out: list[str] = []
    what = f"route {r.name} ({r.kind})"
    if r.lag is not None and r.lag > limits.max_lag:
        out.append(f"{what}: {r.lag} messages behind (threshold {limits.max_lag})")
    elif r.lag and r.members == 0:
        out.append(f"{what}: {r.lag} messages behind and no worker is running "
                   f"('dx {r.kind} run {r.name}')")
    for i in r.incoming:
        if i.failing and i.kind == "pull":
            out.append(f"{what}: the last pull failed: {i.last_error}")
        elif i.failing and i.kind == "files":
            out.append(f"{what}: a dropped file failed: {i.last_error}")
    if r.dead > limits.max_dead:
        out.append(f"{what}: {r.dead} dead task(s); see "
                   f"'dx tasks list --route {r.name} --status dead'")
    return out


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return str(dt.timedelta(seconds=int(seconds)))
