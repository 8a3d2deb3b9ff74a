"""Reading the outbox in commit order (see :mod:`pipeline.capture.ddl` for why it is safe)."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg

_FETCH = """
SELECT t.seq, o.id, o.xid::text, o.entity, o.version, o.op, o.key, o.before, o.after,
       o.origin, o.event_id, o.event_type, t.committed_at
FROM dx.txn t JOIN dx.outbox o ON o.xid = t.xid
WHERE t.seq <= %(frontier)s AND (t.seq > %(seq)s OR (t.seq = %(seq)s AND o.id > %(id)s))
ORDER BY t.seq, o.id
LIMIT %(limit)s
"""


@dataclass(frozen=True, order=True)
class Cursor:
    """Position after the last delivered row: (commit sequence, outbox id)."""

    seq: int = 0
    id: int = 0


class OutboxRow(NamedTuple):
    """One captured change (a tuple: the relay makes one per event, and a frozen dataclass
    costs several times as much to build)."""

    seq: int
    id: int
    xid: int
    entity: str
    version: int
    op: str
    key: Any
    before: dict[str, Any] | None
    after: Any
    origin: str | None
    event_id: uuid.UUID | str | None  # logical capture derives it (text) from the position
    event_type: str | None
    committed_at: dt.datetime

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.seq, self.id)


class OutboxReader:
    """All SQL the relay runs against dx's tables, on one connection it owns."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self._frontier = 0

    def peek(self) -> int:
        """Latest commit number handed out, without waiting on anyone (a cheap change check)."""
        row = self.conn.execute(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM dx.commit_seq"
        ).fetchone()
        self.conn.commit()  # never sit idle in a transaction between polls
        return int(row[0]) if row else 0

    def frontier(self, max_wait_ms: int = 200) -> int:
        """Highest commit number below which every transaction has finished committing.

        Waits for commits in progress, at most ``max_wait_ms``, by watching them: committers
        never queue behind the relay. A transaction that drew its number early and is still
        open (SET CONSTRAINTS ALL IMMEDIATE, a prepared transaction) holds the frontier back
        until it ends; meanwhile the previous frontier is kept: later rows wait, none is
        skipped."""
        row = self.conn.execute("SELECT dx.commit_frontier(%s)", (int(max_wait_ms),)).fetchone()
        self.conn.commit()
        if row is not None and row[0] is not None:
            self._frontier = int(row[0])
        return self._frontier

    def fetch(self, after: Cursor, frontier: int, limit: int) -> list[OutboxRow]:
        rows = self.conn.execute(
            _FETCH, {"frontier": frontier, "seq": after.seq, "id": after.id, "limit": limit}
        ).fetchall()
        self.conn.commit()
        return [OutboxRow(r[0], r[1], int(r[2]), r[3], r[4], r[5], r[6], r[7], r[8], r[9],
                          r[10], r[11], r[12]) for r in rows]

    def delete_upto(self, cursor: Cursor, *, relay_name: str | None = None) -> None:
        """Remove delivered rows (and, for at-least-once, record the cursor) in one transaction."""
        with self.conn.transaction():
            self.conn.execute(
                "DELETE FROM dx.outbox o USING dx.txn t WHERE o.xid = t.xid AND "
                "(t.seq < %(seq)s OR (t.seq = %(seq)s AND o.id <= %(id)s))",
                {"seq": cursor.seq, "id": cursor.id})
            self.conn.execute("DELETE FROM dx.txn WHERE seq < %s", (cursor.seq,))
            if relay_name is not None:
                self.save_cursor(relay_name, cursor)

    def save_cursor(self, relay_name: str, cursor: Cursor) -> None:
        self.conn.execute(
            "INSERT INTO dx.relay_state (name, seq, id) VALUES (%s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET seq = EXCLUDED.seq, id = EXCLUDED.id, "
            "updated_at = now()", (relay_name, cursor.seq, cursor.id))

    def load_cursor(self, relay_name: str) -> Cursor:
        row = self.conn.execute("SELECT seq, id FROM dx.relay_state WHERE name = %s",
                                (relay_name,)).fetchone()
        self.conn.commit()
        return Cursor(int(row[0]), int(row[1])) if row else Cursor()

    def purge_markers(self) -> None:
        """Markers only exist to fire the commit trigger; drop those of finished transactions."""
        self.conn.execute(
            "DELETE FROM dx.txn_marker WHERE xid < pg_snapshot_xmin(pg_current_snapshot())")
        self.conn.commit()

    def database_info(self) -> tuple[str, int]:
        row = self.conn.execute(
            "SELECT current_database(), system_identifier FROM pg_control_system()").fetchone()
        self.conn.commit()
        assert row is not None
        return str(row[0]), int(row[1])
