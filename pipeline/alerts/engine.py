"""Evaluate alert rules and notify once per incident, once on recovery.

An *incident* is one rule firing for one subject (a route, the outbox). Its state lives in
``dx.alert_incident`` so a restarted (or second) ``dx alerts run`` does not alert again: a rule
that keeps firing for hours is one notification, its recovery another. A notification that
cannot be sent leaves the state unchanged, so the next evaluation retries it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import psycopg
from confluent_kafka import KafkaException, TopicPartition

from pipeline.alerts.config import AlertsConfig
from pipeline.alerts.notify import Channel, EmailChannel, WebhookChannel
from pipeline.config.model import DxConfig
from pipeline.db import connect
from pipeline.errors import DxError
from pipeline.tasks import health

log = logging.getLogger(__name__)

DDL = """
CREATE SCHEMA IF NOT EXISTS dx;
CREATE TABLE IF NOT EXISTS dx.alert_incident (
    id          bigserial PRIMARY KEY,
    rule        text NOT NULL,
    subject     text NOT NULL,
    summary     text NOT NULL,
    opened_at   timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS alert_incident_open_idx
    ON dx.alert_incident (rule, subject) WHERE resolved_at IS NULL;
"""


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('dx.alert_incident ensure_schema'))")
        conn.execute(DDL)


@dataclass(frozen=True)
class Observation:
    rule: str
    subject: str
    firing: bool
    summary: str


class AlertEngine:
    def __init__(self, config: DxConfig, alerts: AlertsConfig | None = None) -> None:
        self.config = config
        self.alerts: AlertsConfig = alerts or config.alerts
        self.channels: list[Channel] = []
        if self.alerts.email:
            self.channels.append(EmailChannel(self.alerts.email))
        if self.alerts.webhook:
            self.channels.append(WebhookChannel(self.alerts.webhook))
        self.stop = threading.Event()
        self.url = config.database.url.get_secret_value()

    # -- rules ----------------------------------------------------------------------------------

    def observe(self, conn: psycopg.Connection[Any]) -> list[Observation]:
        rules = self.alerts.rules
        routes = [r.name for r in self.config.sinks]
        obs: list[Observation] = []
        has_tasks = conn.execute("SELECT to_regclass('dx.task')").fetchone() != (None,)
        if rules.dead_tasks is not None and has_tasks:
            dead = dict(conn.execute(
                "SELECT route, count(*) FROM dx.task WHERE status = 'dead' GROUP BY route"
            ).fetchall())
            for route in sorted(set(routes) | set(dead)):
                n = int(dead.get(route, 0))
                obs.append(Observation("dead_tasks", route, n >= rules.dead_tasks,
                                       f"route {route}: {n} dead task(s) "
                                       f"(threshold {rules.dead_tasks}); see "
                                       f"'dx tasks list --route {route} --status dead'"))
        if rules.failure_rate is not None and has_tasks:
            fr = rules.failure_rate
            stats = {r: (int(bad), int(total)) for r, bad, total in conn.execute(
                "SELECT route, count(*) FILTER (WHERE status IN ('dead', 'failed', 'retrying')),"
                " count(*) FROM dx.task WHERE updated_at > now() - make_interval(secs => %s) "
                "GROUP BY route", (fr.window_s,)).fetchall()}
            for route in routes:
                bad, total = stats.get(route, (0, 0))
                rate = bad / total if total else 0.0
                obs.append(Observation(
                    "failure_rate", route, total >= fr.min_tasks and rate >= fr.threshold,
                    f"route {route}: {rate:.1%} of {total} tasks failing in the last "
                    f"{fr.window_s:g}s (threshold {fr.threshold:.1%})"))
        if rules.target_down:
            down = health.read(conn)
            for route in routes:
                h = down.get(route)
                obs.append(Observation(
                    "target_down", route, h is not None and h.target_down,
                    f"route {route}: {h.text()}; deliveries paused, probing"
                    if h is not None and h.target_down else f"route {route}: target answers"))
        if rules.backlog_age_s is not None:
            a = self._backlog_age(conn) or 0.0  # no outbox (yet) or empty: no backlog
            obs.append(Observation("backlog_age", "outbox", a >= rules.backlog_age_s,
                                   f"oldest outbox change is {a:.0f}s old "
                                   f"(threshold {rules.backlog_age_s:g}s)"))
        if rules.consumer_lag is not None:
            for route in self.config.sinks:
                lag = self.consumer_lag(route.consumer_group, list(route.topics))
                if lag is None:
                    continue
                obs.append(Observation("consumer_lag", route.name, lag >= rules.consumer_lag,
                                       f"route {route.name}: {lag} message(s) behind "
                                       f"(threshold {rules.consumer_lag})"))
        conn.commit()
        return obs

    def _backlog_age(self, conn: psycopg.Connection[Any]) -> float | None:
        from pipeline.status import relay_status

        try:
            return relay_status(conn, self.config.relay.name).oldest_pending_age_s
        except psycopg.Error as err:
            log.warning("outbox backlog check failed: %s", err)
            conn.rollback()
            return None

    def consumer_lag(self, group: str, topics: list[str]) -> int | None:
        """Messages between the group's committed offsets and the high watermarks, the way
        ``dx status`` counts them: a consumer caught up on an exactly-once topic is one
        transaction marker short of the high watermark, which is not lag."""
        from pipeline.status import KafkaLag

        try:
            kafka = KafkaLag(self.config, timeout_s=10)
            parts = kafka.partitions(topics)
            tps = [TopicPartition(t, p) for t, ps in parts.items() for p in ps]
            if not tps:
                return None
            committed = kafka.committed(group, tps)
            behind: dict[tuple[str, int, int], int] = {}
            for (t, p), (low, high) in kafka.watermarks(tps).items():
                start = committed.get((t, p), low)
                if high > start:
                    behind[(t, p, start)] = high - start
            markers = kafka.only_markers({k for k, n in behind.items() if n <= 50})
            return sum(n for k, n in behind.items() if k not in markers)
        except KafkaException as err:
            log.warning("consumer lag check for %s failed: %s", group, err)
            return None

    # -- incidents ------------------------------------------------------------------------------

    def evaluate_once(self) -> list[str]:
        """One evaluation: returns what was notified (for the CLI and tests)."""
        sent: list[str] = []
        with connect(self.url, application_name="dx-alerts") as conn:
            ensure_schema(conn)
            for o in self.observe(conn):
                sent.extend(self._apply(conn, o))
        return sent

    def _apply(self, conn: psycopg.Connection[Any], o: Observation) -> list[str]:
        with conn.transaction():
            row = conn.execute(
                "SELECT id, opened_at FROM dx.alert_incident WHERE rule = %s AND subject = %s "
                "AND resolved_at IS NULL FOR UPDATE", (o.rule, o.subject)).fetchone()
            if o.firing and row is None:
                incident = conn.execute(
                    "INSERT INTO dx.alert_incident (rule, subject, summary) VALUES (%s, %s, %s) "
                    "RETURNING id", (o.rule, o.subject, o.summary)).fetchone()
                assert incident is not None
                self._notify("FIRING", o, int(incident[0]))  # raises: the insert rolls back
                return [f"FIRING {o.rule} {o.subject}: {o.summary}"]
            if o.firing and row is not None:
                conn.execute("UPDATE dx.alert_incident SET last_seen = now(), summary = %s "
                             "WHERE id = %s", (o.summary, row[0]))
                return []
            if not o.firing and row is not None:
                conn.execute("UPDATE dx.alert_incident SET resolved_at = now() WHERE id = %s",
                             (row[0],))
                self._notify("RESOLVED", o, int(row[0]))
                return [f"RESOLVED {o.rule} {o.subject}: {o.summary}"]
        return []

    def _notify(self, state: str, o: Observation, incident: int) -> None:
        subject = f"{self.alerts.subject_prefix} {state}: {o.rule} {o.subject}"
        body = (f"{state}: {o.summary}\n\nincident #{incident}, rule {o.rule}, "
                f"subject {o.subject}.\nOne message per incident; you will get one more when it "
                "recovers.\n")
        doc = {"state": state.lower(), "rule": o.rule, "subject": o.subject,
               "summary": o.summary, "incident": incident}
        for ch in self.channels:
            ch.send(subject, body, doc)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for line in self.evaluate_once():
                    log.warning("alert %s", line)
            except DxError as err:
                log.warning("alert evaluation failed: %s", err)
            except psycopg.Error as err:
                log.warning("alert evaluation failed: %s", err)
            self.stop.wait(self.alerts.interval_s)
