"""What the dashboard shows: ``dx status`` (pipeline.status.collect: backlog, relay and
standbys, long transactions, per-route lag, workers and task counts, paused routes), plus each
route's failure rate and last error, and the open alert incidents.

``collect`` asks Kafka for every route's lag, so one result is shared for ``ttl_s`` by every
viewer: ten people with the dashboard open cost one status query per few seconds, not ten.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pipeline.config import DxConfig
from pipeline.status import STATUS_ORDER, Status, Thresholds, collect, table_exists
from pipeline.tasks.query import last_errors
from pipeline.tasks.store import TaskStore


@dataclass
class View:
    status: Status
    health: dict[str, dict[str, Any]]
    incidents: list[dict[str, Any]]
    taken_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        st = self.status.to_json()
        for r in st["routes"]:
            r.update({k: v for k, v in self.health.get(r["name"], {}).items()
                      if k != "last_error_at"})
        return {**st, "incidents": [{**i, "opened_at": i["opened_at"].isoformat(),
                                     "last_seen": i["last_seen"].isoformat()}
                                    for i in self.incidents],
                "taken_at": self.taken_at}


STATUSES = STATUS_ORDER


def incidents(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Open alert incidents, newest first ([] before the alert table exists)."""
    if not table_exists(conn, "dx.alert_incident"):
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT id, rule, subject, summary, opened_at, last_seen "
                    "FROM dx.alert_incident WHERE resolved_at IS NULL ORDER BY opened_at DESC")
        rows = list(cur.fetchall())
    conn.commit()
    return rows


def route_health(conn: psycopg.Connection[Any], routes: list[str], window_s: float = 3600
                 ) -> dict[str, dict[str, Any]]:
    """Per route: failure rate over the last ``window_s`` (failed, retrying and dead among the
    tasks updated in it) and the newest error with its time."""
    store = TaskStore(conn)
    if not store.exists():
        return {}
    out: dict[str, dict[str, Any]] = {}
    for route, (bad, total) in store.failing_in_window(window_s).items():
        out.setdefault(route, {})["failure_rate"] = bad / total if total else 0.0
    for route, (error, at) in last_errors(conn, routes).items():
        out.setdefault(route, {}).update(last_error=error, last_error_at=at)
    return out


class Dashboard:
    """The dashboard's data, cached for ``ttl_s`` (thread-safe)."""

    def __init__(self, cfg: DxConfig, ttl_s: float = 3.0, kafka_timeout_s: float = 3.0) -> None:
        self.cfg = cfg
        self.ttl_s = ttl_s
        self.limits = Thresholds(kafka_timeout_s=kafka_timeout_s)
        self._lock = threading.Lock()
        self._view: View | None = None
        self._at = float("-inf")

    def view(self, conn: psycopg.Connection[Any], fresh: bool = False) -> View:
        with self._lock:
            if fresh or self._view is None or time.monotonic() - self._at > self.ttl_s:
                status = collect(conn, self.cfg, self.limits)
                self._view = View(status, route_health(conn, [r.name for r in status.routes]),
                                  incidents(conn))
                self._at = time.monotonic()
            return self._view

    def invalidate(self) -> None:
        """Forget the cached view (after an action that changes it)."""
        with self._lock:
            self._view = None
