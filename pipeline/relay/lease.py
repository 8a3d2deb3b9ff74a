"""One active relay per outbox (per database, whatever the relay's name): a session-level
advisory lock on a dedicated connection.

If the active relay dies, PostgreSQL ends its session and releases the lock; a standby polling
``try_acquire`` takes over within ``standby_poll_s``. In exactly-once mode Kafka's
transactional.id fencing additionally stops a zombie that lost its lease from committing.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from pipeline.capture.ddl import LEASE_KEY
from pipeline.errors import TransientError


class LeaseLost(TransientError):
    pass


class Lease:
    def __init__(self, conn: psycopg.Connection[Any], name: str) -> None:
        self.conn = conn
        self.name = name
        self.held = False
        self._checked = 0.0

    def try_acquire(self) -> bool:
        row = self.conn.execute("SELECT pg_try_advisory_lock(%s, %s)", LEASE_KEY).fetchone()
        self.held = bool(row and row[0])
        return self.held

    def holder(self) -> str | None:
        row = self.conn.execute(
            "SELECT a.application_name || ' pid ' || a.pid FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
            "AND l.classid = %s AND l.objid = %s AND l.objsubid = 2 AND l.granted "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            LEASE_KEY).fetchone()
        return str(row[0]) if row else None

    def check(self, every_s: float = 1.0) -> None:
        """Raise LeaseLost if the lease connection is gone (then the lock is gone too)."""
        now = time.monotonic()
        if now - self._checked < every_s:
            return
        self._checked = now
        try:
            self.conn.execute("SELECT 1")
        except psycopg.Error:
            self.held = False
            raise LeaseLost(f"relay {self.name!r} lost its lease connection") from None
