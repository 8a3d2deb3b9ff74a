"""Pausing a route: ``dx.route_state`` says which routes an operator paused, and
:class:`RoutePause` is how a running worker asks.

A paused worker keeps its consumer-group membership and its partitions (no rebalance) but stops
fetching (``Consumer.pause`` of its assignment); nothing is committed while paused, so on resume
it goes on exactly where it stopped. The table is the only truth: pausing is a row, not a signal,
so every replica of a route, a restarted worker and a worker started later all see it. Workers
re-read it at most once a second (:class:`RoutePause` caches), which is what "stops within
seconds" costs: one indexed primary-key lookup per second per worker.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg

from pipeline.db import connect

log = logging.getLogger(__name__)

RouteKindName = Literal["sink", "source"]
KINDS: tuple[RouteKindName, ...] = ("sink", "source")

DDL = """
CREATE SCHEMA IF NOT EXISTS dx;
CREATE TABLE IF NOT EXISTS dx.route_state (
    kind       text        NOT NULL CHECK (kind IN ('sink', 'source')),
    route      text        NOT NULL,
    paused     boolean     NOT NULL DEFAULT false,
    changed_by text,
    changed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, route)
);
COMMENT ON TABLE dx.route_state IS
  'dx: routes an operator paused (workers stop consuming, keep their place, resume on resume)';
"""


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create ``dx.route_state`` (idempotent; ``dx init`` calls it). Commits."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('dx.route_state ensure_schema'))")
        conn.execute(DDL)


@dataclass(frozen=True)
class RouteState:
    kind: str
    route: str
    paused: bool
    changed_by: str | None
    changed_at: datetime


def set_paused(conn: psycopg.Connection[Any], kind: RouteKindName, route: str, paused: bool,
               who: str) -> bool:
    """Pause or resume ``route``; returns whether the state changed (pausing a paused route is
    not an error, and not a change). Runs in the caller's transaction; the caller commits (so
    the console can write its audit row in the same transaction)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    row = conn.execute(
        "INSERT INTO dx.route_state AS s (kind, route, paused, changed_by) "
        "VALUES (%s, %s, %s, %s) ON CONFLICT (kind, route) DO UPDATE "
        "SET paused = EXCLUDED.paused, changed_by = EXCLUDED.changed_by, changed_at = now() "
        "WHERE s.paused IS DISTINCT FROM EXCLUDED.paused RETURNING 1",
        (kind, route, paused, who)).fetchone()
    return row is not None


def states(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], RouteState]:
    """Every stored route state by (kind, route); {} before ``dx init`` created the table."""
    exists = conn.execute("SELECT to_regclass('dx.route_state') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute(
        "SELECT kind, route, paused, changed_by, changed_at FROM dx.route_state").fetchall()
    return {(str(k), str(r)): RouteState(str(k), str(r), bool(p), by, at)
            for k, r, p, by, at in rows}


def paused_routes(conn: psycopg.Connection[Any]) -> set[tuple[str, str]]:
    """(kind, route) of the routes paused now."""
    return {k for k, s in states(conn).items() if s.paused}


class RoutePause:
    """Whether an operator paused this route, for the worker's loop.

    ``paused()`` is cheap to call every iteration: it re-reads the table at most once per
    ``interval_s`` over its own connection. When the database cannot be read the last known
    answer stands (a database outage must neither pause nor resume a route by itself); the
    worker's own database work will report the outage.
    """

    def __init__(self, database_url: str, kind: RouteKindName, route: str, *,
                 interval_s: float = 1.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.url = database_url
        self.kind = kind
        self.route = route
        self.interval_s = interval_s
        self._paused = False
        self._read_at = float("-inf")
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def paused(self) -> bool:
        """True while the route is paused (at most ``interval_s`` old)."""
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= self.interval_s:
                self._read_at = now
                was = self._paused
                self._paused = self._read(was)
                if self._paused != was:
                    log.warning("route %s (%s): %s by an operator", self.route, self.kind,
                                "paused" if self._paused else "resumed")
            return self._paused

    def _read(self, default: bool) -> bool:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self.url, autocommit=True,
                                     application_name=f"dx-{self.kind}-{self.route}:pause")
            row = self._conn.execute(
                "SELECT paused FROM dx.route_state WHERE kind = %s AND route = %s",
                (self.kind, self.route)).fetchone()
            return bool(row and row[0])
        except psycopg.errors.UndefinedTable:
            return False  # no 'dx init' since pausing existed: nothing can be paused
        except Exception as err:  # keep the last answer (see the class docstring)
            log.debug("route %s: cannot read the pause state: %s", self.route, err)
            self.close()
            return default

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
