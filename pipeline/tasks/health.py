"""``dx.route_health``: what a sink worker's circuit breaker says about its target.

One row per route, written by the route's worker when its breaker opens or closes (and every
30 s while it runs); read by ``dx status`` ("target down since ...") and the alert rules.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import psycopg

DDL = """
CREATE SCHEMA IF NOT EXISTS dx;
CREATE TABLE IF NOT EXISTS dx.route_health (
    route       text PRIMARY KEY,
    target_down boolean NOT NULL DEFAULT false,
    down_since  timestamptz,
    last_error  text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True)
class RouteHealth:
    route: str
    target_down: bool
    down_since: dt.datetime | None
    last_error: str | None
    updated_at: dt.datetime

    def text(self) -> str:
        since = self.down_since.strftime("%Y-%m-%d %H:%M:%S UTC") if self.down_since else "?"
        return f"target down since {since}: {self.last_error or 'transient failures'}"


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('dx.route_health ensure_schema'))")
        conn.execute(DDL)


def publish(conn: psycopg.Connection[Any], route: str, down: bool, since: float | None,
            error: str | None) -> None:
    conn.execute(
        "INSERT INTO dx.route_health (route, target_down, down_since, last_error) "
        "VALUES (%s, %s, to_timestamp(%s), %s) ON CONFLICT (route) DO UPDATE SET "
        "target_down = EXCLUDED.target_down, down_since = EXCLUDED.down_since, "
        "last_error = EXCLUDED.last_error, updated_at = now()",
        (route, down, since, (error or "")[:500] or None))
    conn.commit()


def read(conn: psycopg.Connection[Any]) -> dict[str, RouteHealth]:
    """Every route's health ({} when no worker created the table yet)."""
    if conn.execute("SELECT to_regclass('dx.route_health')").fetchone() == (None,):
        conn.commit()
        return {}
    rows = conn.execute("SELECT route, target_down, down_since, last_error, updated_at "
                        "FROM dx.route_health").fetchall()
    conn.commit()
    return {str(r[0]): RouteHealth(str(r[0]), bool(r[1]), r[2], r[3], r[4]) for r in rows}
