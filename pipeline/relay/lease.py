"""One active relay per outbox (per database, whatever the relay's name): a session-level
advisory lock on a dedicated connection, plus a renewed lease row a standby can rely on.

The lock alone is not enough. PostgreSQL releases it when the holder's session ends, but a
frozen process (SIGSTOP, a VM paused, a stuck GC) keeps its TCP connection answering keepalives,
and a relay cut off by a network partition keeps its session until the server's TCP gives up:
either way the standby waited for hours. So the active relay also renews ``dx.relay_lease``
(its backend pid, its name, the database's clock) every ``timeout_s / 5`` from a thread of its
own, and a standby that finds the row older than ``timeout_s`` terminates the holder's sessions
(``pg_terminate_backend``), which releases the lock, and takes over. The old holder fences
itself first: with no successful renewal for ``0.6 * timeout_s`` its :meth:`Lease.check`
raises, so it stops publishing before the standby starts; in exactly-once mode Kafka's
transactional.id fencing additionally stops a zombie from committing.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg

from pipeline.capture.ddl import LEASE_KEY
from pipeline.errors import TransientError

log = logging.getLogger(__name__)

#: share of the lease timeout after which an active relay that could not renew stops itself
SELF_FENCE = 0.6

_TAKE_STALE = """
SELECT count(*) FILTER (WHERE pg_terminate_backend(a.pid, 5000))
FROM dx.relay_lease l JOIN pg_stat_activity a
  ON (a.pid = l.backend_pid AND a.application_name = l.holder)
  OR left(a.application_name, length(l.holder) + 1) = l.holder || ':'
WHERE clock_timestamp() - l.renewed_at > make_interval(secs => %s)
"""


class LeaseLost(TransientError):
    pass


class Lease:
    def __init__(self, conn: psycopg.Connection[Any], name: str, *,
                 timeout_s: float = 30.0) -> None:
        self.conn = conn
        self.name = name
        self.timeout_s = timeout_s
        self.held = False
        self._renewed = 0.0  # monotonic time of the last successful renewal
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self) -> bool:
        """Take the lease if it is free, or if its holder stopped renewing it (then its
        sessions are terminated first)."""
        if not self._lock():
            stale = self._take_stale()
            if not stale or not self._lock():
                return False
            log.warning("relay %s: took over the lease from a holder that stopped renewing it "
                        "for %.0fs (%d session(s) terminated)", self.name, self.timeout_s, stale)
        self.conn.execute(
            "INSERT INTO dx.relay_lease (id, holder, backend_pid, renewed_at) "
            "VALUES (1, current_setting('application_name'), pg_backend_pid(), "
            "clock_timestamp()) ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder, "
            "backend_pid = EXCLUDED.backend_pid, renewed_at = EXCLUDED.renewed_at")
        self.held = True
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._renew_loop, name="dx-relay-lease",
                                        daemon=True)
        self._thread.start()
        return True

    def _lock(self) -> bool:
        row = self.conn.execute("SELECT pg_try_advisory_lock(%s, %s)", LEASE_KEY).fetchone()
        return bool(row and row[0])

    def _take_stale(self) -> int:
        try:
            row = self.conn.execute(_TAKE_STALE, (self.timeout_s,)).fetchone()
        except psycopg.errors.InsufficientPrivilege as err:
            log.warning("relay %s: the lease holder stopped renewing, but this role may not end "
                        "its sessions (%s); waiting for PostgreSQL to drop them", self.name,
                        str(err).strip().splitlines()[0])
            return 0
        return int(row[0]) if row else 0

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.timeout_s / 5):
            try:
                row = self.conn.execute(
                    "UPDATE dx.relay_lease SET renewed_at = clock_timestamp() "
                    "WHERE backend_pid = pg_backend_pid() RETURNING 1").fetchone()
            except psycopg.Error as err:
                self._lost = f"its lease connection failed ({type(err).__name__})"
                return
            if row is None:
                self._lost = "another relay took its lease over"
                return
            self._renewed = time.monotonic()

    def release(self) -> None:
        """Stop renewing (the caller closes the connection, which releases the lock)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s)

    def holder(self) -> str | None:
        row = self.conn.execute(
            "SELECT a.application_name || ' pid ' || a.pid FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
            "AND l.classid = %s AND l.objid = %s AND l.objsubid = 2 AND l.granted "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            LEASE_KEY).fetchone()
        return str(row[0]) if row else None

    def check(self, every_s: float = 1.0) -> None:
        """Raise LeaseLost when this relay may no longer act as the active one: its renewals
        failed, another relay took the lease over, or none succeeded for ``0.6 * timeout_s``
        (the process was frozen, or PostgreSQL is out of reach). ``every_s`` is kept for
        callers; the check only reads what the renewal thread recorded."""
        reason = self._lost
        silent = time.monotonic() - self._renewed
        if reason is None and silent > SELF_FENCE * self.timeout_s:
            reason = f"it could not renew its lease for {silent:.0f}s"
        if reason is not None:
            self.held = False
            raise LeaseLost(f"relay {self.name!r} lost its lease: {reason}")
