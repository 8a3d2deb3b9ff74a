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
from confluent_kafka import KafkaException
from psycopg.types.json import Jsonb

from pipeline.alerts.notify import Channel, EmailChannel, WebhookChannel
from pipeline.config.alerts import AlertsConfig
from pipeline.config.model import DxConfig
from pipeline.db import connect
from pipeline.errors import DxError, TransientError
from pipeline.tasks import health
from pipeline.tasks.store import TaskStore

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
-- channels a notification could not reach yet (retried each evaluation), and what was sent
ALTER TABLE dx.alert_incident ADD COLUMN IF NOT EXISTS undelivered text[];
ALTER TABLE dx.alert_incident ADD COLUMN IF NOT EXISTS notice jsonb;
"""


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('dx.alert_incident ensure_schema'))")
        conn.execute(DDL)


@dataclass(frozen=True)
class Observation:
    """One rule's verdict on one subject (a route, or the outbox). For task rules, ``count``
    and the first few ``tasks`` (id, key, reason) and the ``command`` that lists them all."""

    rule: str
    subject: str
    firing: bool
    summary: str
    route: str | None = None
    count: int | None = None
    tasks: tuple[dict[str, Any], ...] = ()
    command: str | None = None


FIRST_TASKS = 5


class AlertEngine:
    def __init__(self, config: DxConfig, alerts: AlertsConfig | None = None) -> None:
        self.config = config
        self.alerts: AlertsConfig = alerts or config.alerts
        self.channels: list[Channel] = []  # who hears about everything
        if self.alerts.email and self.alerts.email.to:
            self.channels.append(EmailChannel(self.alerts.email))
        if self.alerts.webhook:
            self.channels.append(WebhookChannel(self.alerts.webhook))
        self.stop = threading.Event()
        self.url = config.database.url.get_secret_value()

    # -- rules ----------------------------------------------------------------------------------

    def observe(self, conn: psycopg.Connection[Any]) -> list[Observation]:
        rules = self.alerts.rules
        sinks = [r.name for r in self.config.sinks]
        routes = sinks + [r.name for r in self.config.sources]
        obs: list[Observation] = []
        store = TaskStore(conn)
        has_tasks = store.exists()
        if rules.dead_tasks is not None and has_tasks:
            dead = {r: c.get("dead", 0) for r, c in store.counts_by_route(["dead"]).items()}
            for route in sorted(set(routes) | {r for r, n in dead.items() if n}):
                n = int(dead.get(route, 0))
                firing = n >= rules.dead_tasks
                obs.append(Observation(
                    "dead_tasks", route, firing, f"route {route}: {n} dead task(s) "
                    f"(threshold {rules.dead_tasks})", route=route, count=n,
                    tasks=self._first(conn, route, ("dead",)) if firing else (),
                    command=f"dx tasks list --route {route} --status dead"))
        if rules.failure_rate is not None and has_tasks:
            # sink routes only: source workers record failures, not every success
            fr = rules.failure_rate
            stats = store.failing_in_window(fr.window_s)
            for route in sinks:
                bad, total = stats.get(route, (0, 0))
                rate = bad / total if total else 0.0
                firing = total >= fr.min_tasks and rate >= fr.threshold
                obs.append(Observation(
                    "failure_rate", route, firing,
                    f"route {route}: {rate:.1%} of {total} tasks failing in the last "
                    f"{fr.window_s:g}s (threshold {fr.threshold:.1%})", route=route, count=bad,
                    tasks=self._first(conn, route, ("dead", "failed", "retrying"))
                    if firing else (),
                    command=f"dx tasks list --route {route} --status dead --status failed "
                            f"--status retrying --since {fr.window_s:g}s"))
        if rules.target_down:
            down = health.read(conn)
            for route in sinks:
                h = down.get(route)
                firing = h is not None and h.target_down
                obs.append(Observation(
                    "target_down", route, firing,
                    f"route {route}: {h.text()}; deliveries paused, probing"
                    if h is not None and firing else f"route {route}: target answers",
                    route=route, command=f"dx status; dx tasks list --route {route} "
                                         "--status retrying"))
        if rules.backlog_age_s is not None:
            a = self._backlog_age(conn) or 0.0  # no outbox (yet) or empty: no backlog
            obs.append(Observation("backlog_age", "outbox", a >= rules.backlog_age_s,
                                   f"oldest outbox change is {a:.0f}s old "
                                   f"(threshold {rules.backlog_age_s:g}s)", command="dx status"))
        if rules.slot_retained_bytes is not None or rules.slot_confirm_age_s is not None:
            obs.extend(self._slot(conn))
        if rules.consumer_lag is not None:
            for r in self._lag(conn):
                if r.lag is None:
                    continue
                obs.append(Observation(
                    "consumer_lag", r.name, r.lag >= rules.consumer_lag,
                    f"route {r.name}: {r.lag} message(s) behind (threshold "
                    f"{rules.consumer_lag})", route=r.name, count=r.lag, command="dx status"))
        conn.commit()
        return obs

    def _first(self, conn: psycopg.Connection[Any], route: str,
               statuses: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
        rows = TaskStore(conn).first(route, statuses, FIRST_TASKS)
        return tuple({"id": int(r["id"]), "key": r["key"], "reason": (r["error"] or "")[:300]}
                     for r in rows)

    def _lag(self, conn: psycopg.Connection[Any]) -> list[Any]:
        """Lag of every sink and source route, the way ``dx status`` counts it."""
        from pipeline.status import KafkaLag, configured_routes, source_offsets

        routes = configured_routes(self.config)
        try:
            KafkaLag(self.config, timeout_s=10).fill(routes, source_offsets(conn))
        except KafkaException as err:
            log.warning("consumer lag check failed: %s", err)
            return []
        return routes

    def _slot(self, conn: psycopg.Connection[Any]) -> list[Observation]:
        """Logical capture: the replication slot makes PostgreSQL keep WAL until the relay
        confirms it, so a stopped or stuck relay fills the disk (or, with
        ``max_slot_wal_keep_size``, gets the slot invalidated: a re-snapshot). Fires on either
        threshold, and on a slot that is gone or invalidated."""
        from pipeline.capture import logical

        try:
            if logical.installed_mode(conn) != "logical":
                conn.commit()
                return []
            name, info = logical.current_slot(conn), logical.slot_info(conn)
        except psycopg.Error as err:
            log.warning("replication slot check failed: %s", err)
            conn.rollback()
            return []
        conn.commit()
        rules = self.alerts.rules
        runbook = "see the README runbook 'lost replication slot'"
        if info is None or info.lost:
            what = "is missing" if info is None else "was invalidated"
            return [Observation("replication_slot", name, True,
                                f"replication slot {name} {what}: the relay stops; {runbook}",
                                command="dx status")]
        retained, age = info.retained_bytes or 0, info.confirmed_age_s or 0.0
        over: list[str] = []
        if rules.slot_retained_bytes is not None and retained >= rules.slot_retained_bytes:
            over.append(f"retains {retained} bytes of WAL (threshold "
                        f"{rules.slot_retained_bytes})")
        if rules.slot_confirm_age_s is not None and age >= rules.slot_confirm_age_s:
            over.append(f"not confirmed for {age:.0f}s (threshold {rules.slot_confirm_age_s:g}s)")
        summary = (f"replication slot {name} " + "; ".join(over) + ": is the relay running? "
                   "PostgreSQL keeps the WAL until it confirms" if over else
                   f"replication slot {name} retains {retained} bytes of WAL, confirmed "
                   f"{age:.0f}s ago")
        return [Observation("replication_slot", name, bool(over), summary, count=retained,
                            command="dx status")]

    def _backlog_age(self, conn: psycopg.Connection[Any]) -> float | None:
        from pipeline.status import relay_status

        try:
            return relay_status(conn, self.config.relay.name).oldest_pending_age_s
        except psycopg.Error as err:
            log.warning("outbox backlog check failed: %s", err)
            conn.rollback()
            return None

    # -- incidents ------------------------------------------------------------------------------

    def evaluate_once(self) -> list[str]:
        """One evaluation: returns what was notified (for the CLI and tests)."""
        sent: list[str] = []
        with connect(self.url, application_name="dx-alerts") as conn:
            ensure_schema(conn)
            self._redeliver(conn)
            for o in self.observe(conn):
                try:
                    sent.extend(self._apply(conn, o))
                except TransientError as err:
                    # this incident's channels are all down: it is tried again next
                    # evaluation; the other incidents (other recipients) still go now
                    log.warning("%s (retried next evaluation)", err)
        return sent

    def channels_for(self, o: Observation) -> list[Channel]:
        """Everyone who hears about everything, plus the recipients of this route or rule."""
        out = {ch.name: ch for ch in self.channels}
        for r in self.alerts.recipients:
            if r.routes is not None and o.route not in r.routes:
                continue
            if r.rules is not None and o.rule not in r.rules:
                continue
            extra: list[Channel] = []
            if r.email and self.alerts.email is not None:
                extra.append(EmailChannel(self.alerts.email, r.email))
            if r.webhook is not None:
                extra.append(WebhookChannel(r.webhook))
            out.update((ch.name, ch) for ch in extra)
        return list(out.values())

    def _apply(self, conn: psycopg.Connection[Any], o: Observation) -> list[str]:
        with conn.transaction():
            row = conn.execute(
                "SELECT id FROM dx.alert_incident WHERE rule = %s AND subject = %s "
                "AND resolved_at IS NULL FOR UPDATE", (o.rule, o.subject)).fetchone()
            if o.firing and row is None:
                incident = conn.execute(
                    "INSERT INTO dx.alert_incident (rule, subject, summary) VALUES (%s, %s, %s) "
                    "RETURNING id", (o.rule, o.subject, o.summary)).fetchone()
                assert incident is not None
                self._notify(conn, "FIRING", o, int(incident[0]))  # all failed: rolls back
                return [f"FIRING {o.rule} {o.subject}: {o.summary}"]
            if o.firing and row is not None:
                conn.execute("UPDATE dx.alert_incident SET last_seen = now(), summary = %s "
                             "WHERE id = %s", (o.summary, row[0]))
                return []
            if not o.firing and row is not None:
                conn.execute("UPDATE dx.alert_incident SET resolved_at = now() WHERE id = %s",
                             (row[0],))
                self._notify(conn, "RESOLVED", o, int(row[0]))
                return [f"RESOLVED {o.rule} {o.subject}: {o.summary}"]
        return []

    def message(self, state: str, o: Observation, incident: int) -> tuple[str, str, dict[str, Any]]:
        """Subject, text and webhook document of one notification."""
        subject = f"{self.alerts.subject_prefix} {state}: {o.rule} {o.subject}"
        lines = [f"{state}: {o.summary}", ""]
        if o.route:
            lines.append(f"route:   {o.route}")
        lines.append(f"rule:    {o.rule}")
        if o.count is not None:
            lines.append(f"count:   {o.count}")
        if o.tasks and state == "FIRING":
            lines.append(f"first {len(o.tasks)} task(s):")
            lines += [f"  #{t['id']}  key {t['key']}  {t['reason']}" for t in o.tasks]
        if o.command:
            lines.append(f"see them: {o.command}")
        lines += ["", f"incident #{incident}. One message per incident; you will get one more "
                  "when it recovers."]
        doc = {"state": state.lower(), "rule": o.rule, "subject": o.subject, "route": o.route,
               "summary": o.summary, "count": o.count, "tasks": list(o.tasks),
               "command": o.command, "incident": incident}
        return subject, "\n".join(lines) + "\n", doc

    def _notify(self, conn: psycopg.Connection[Any], state: str, o: Observation,
                incident: int) -> None:
        """Send to every channel of ``o``; one failing channel never stops the others. All
        failed: raise (the incident's change rolls back and is tried again next evaluation);
        some failed: they are kept in ``undelivered`` and retried next evaluation."""
        subject, body, doc = self.message(state, o, incident)
        channels = self.channels_for(o)
        failed = self._send(channels, subject, body, doc)
        if channels and len(failed) == len(channels):
            raise TransientError(f"alert {o.rule} {o.subject}: no channel reachable")
        conn.execute("UPDATE dx.alert_incident SET undelivered = %s, notice = %s WHERE id = %s",
                     (failed or None, Jsonb({"subject": subject, "body": body, "doc": doc,
                                             "route": o.route, "rule": o.rule}), incident))

    def _send(self, channels: list[Channel], subject: str, body: str,
              doc: dict[str, Any]) -> list[str]:
        failed: list[str] = []
        for ch in channels:
            try:
                ch.send(subject, body, doc)
            except Exception as err:  # any channel failure: the others still go
                log.warning("alert channel %s failed: %s", ch.name, err)
                failed.append(ch.name)
        return failed

    def _redeliver(self, conn: psycopg.Connection[Any]) -> None:
        """Channels an earlier notification did not reach: try them again."""
        rows = conn.execute("SELECT id, undelivered, notice FROM dx.alert_incident "
                            "WHERE undelivered IS NOT NULL").fetchall()
        conn.commit()
        for incident, undelivered, notice in rows:
            o = Observation(str(notice["rule"]), "", True, "", route=notice.get("route"))
            channels = [ch for ch in self.channels_for(o) if ch.name in set(undelivered)]
            failed = self._send(channels, notice["subject"], notice["body"], notice["doc"])
            conn.execute("UPDATE dx.alert_incident SET undelivered = %s WHERE id = %s",
                         (failed or None, incident))
            conn.commit()

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
