"""Transaction ids brought from another cluster (a dump restored into a new one).

Trigger capture ties an outbox row to its commit by transaction id (``dx.outbox.xid`` =
``dx.txn.xid``, both ``pg_current_xact_id()``). Transaction ids are unique within one cluster
only: a ``pg_dump`` restored into a fresh cluster (``initdb``) brings pending rows whose ids that
cluster hands out again, so a new transaction can share its id with a restored, unpublished
one, and the relay would pair each with the other's commit (published twice, out of order, or
deleted as already published).

So when the relay meets a database whose rows came from another cluster (the system identifier
recorded with its cursor differs, or a recorded id lies beyond what this cluster has handed
out), it moves every committed id out of the range a cluster hands out (adds ``2**62``; the
pairing and the commit order are unchanged, ``source.txId`` of those events carries the moved
id) before it reads anything. If a new transaction already collided, the rows cannot be told
apart: it refuses with one line instead (README runbook "restored into a new cluster").
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from pipeline.errors import TerminalError

log = logging.getLogger(__name__)

#: ids at or above this were moved here from another cluster (a cluster hands out ids far below)
FOREIGN_BASE = 1 << 62

RUNBOOK = "see the README runbook 'restored into a new cluster'"


class TransactionIdsCollide(TerminalError):
    """New transactions reuse the ids of restored, unpublished ones: their rows are ambiguous."""


def from_elsewhere(conn: psycopg.Connection[Any]) -> bool:
    """A pending commit with an id this cluster has not handed out yet came from another."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM dx.txn WHERE xid < %s::text::xid8 "
        "AND xid >= pg_snapshot_xmax(pg_current_snapshot()))", (FOREIGN_BASE,)).fetchone()
    conn.commit()
    return bool(row and row[0])


def collisions(conn: psycopg.Connection[Any]) -> list[str]:
    """Ids that two pending commits share (only possible after a restore into a new cluster)."""
    rows = conn.execute("SELECT xid::text FROM dx.txn GROUP BY xid HAVING count(*) > 1 "
                        "ORDER BY xid LIMIT 5").fetchall()
    conn.commit()
    return [str(r[0]) for r in rows]


def check(conn: psycopg.Connection[Any], relay_name: str) -> None:
    """Refuse (one line) when pending commits share a transaction id."""
    shared = collisions(conn)
    if shared:
        raise TransactionIdsCollide(
            f"relay {relay_name}: this database was restored into another cluster and new "
            f"transactions reuse the ids of restored, unpublished ones (xid "
            f"{', '.join(shared)}): their changes cannot be told apart, nothing was "
            f"published; {RUNBOOK}")


def rebase(conn: psycopg.Connection[Any], relay_name: str) -> int:
    """Move the committed ids below :data:`FOREIGN_BASE` above it, outbox and commits in one
    snapshot (so a commit landing meanwhile keeps its pair); returns the commits moved."""
    check(conn, relay_name)
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        params = {"base": FOREIGN_BASE}
        moved = conn.execute(
            "UPDATE dx.txn SET xid = (xid::text::numeric + %(base)s)::text::xid8 "
            "WHERE xid < %(base)s::text::xid8", params).rowcount
        conn.execute(
            "UPDATE dx.outbox SET xid = (xid::text::numeric + %(base)s)::text::xid8 "
            "WHERE xid < %(base)s::text::xid8", params)
    log.warning("relay %s: the database came from another cluster; moved the transaction ids "
                "of %d pending commit(s) out of this cluster's range so new ones cannot "
                "collide with them", relay_name, moved)
    return moved
