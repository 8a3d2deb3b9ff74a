"""Setting an outbox row aside when it cannot become an event.

The relay publishes in commit order and stops at a row it cannot encode (see
:class:`pipeline.errors.OutboxRowError`) instead of skipping it. Quarantine is the operator's
explicit decision to move that one row out of the way: it is kept, with the reason, in
``dx.outbox_quarantine`` (``dx status`` counts it), never silently dropped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from pipeline.errors import CatalogError

_MOVE = """
WITH row AS (
    DELETE FROM dx.outbox o USING dx.txn t
    WHERE t.seq = %(seq)s AND o.xid = t.xid AND o.id = %(id)s
    RETURNING t.seq, o.*
)
INSERT INTO dx.outbox_quarantine (seq, id, xid, entity, version, op, key, before, after, origin,
                                  event_id, event_type, created_at, reason)
SELECT seq, id, xid, entity, version, op, key, before, after, origin, event_id, event_type,
       created_at, %(reason)s
FROM row
RETURNING entity, key::text
"""


@dataclass(frozen=True)
class Quarantined:
    seq: int
    id: int
    entity: str
    key: str | None
    reason: str
    quarantined_at: Any


def parse_position(text: str) -> tuple[int, int]:
    """``SEQ:ID`` as printed by the relay's error line."""
    try:
        seq, id_ = (int(p) for p in text.split(":"))
    except ValueError:
        raise CatalogError(f"outbox row {text!r}: expected SEQ:ID as in the relay's error "
                           "line, e.g. 1042:77") from None
    return seq, id_


def quarantine(conn: psycopg.Connection[Any], seq: int, id_: int, reason: str) -> tuple[str, str]:
    """Move one committed outbox row to ``dx.outbox_quarantine``; (entity, key) of the row."""
    with conn.transaction():
        row = conn.execute(_MOVE, {"seq": seq, "id": id_, "reason": reason}).fetchone()
    if row is None:
        raise CatalogError(f"no pending outbox row {seq}:{id_} (already relayed, quarantined, "
                           "or not committed yet)")
    return str(row[0]), str(row[1])


def quarantined(conn: psycopg.Connection[Any]) -> list[Quarantined]:
    rows = conn.execute("SELECT seq, id, entity, key::text, reason, quarantined_at "
                        "FROM dx.outbox_quarantine ORDER BY seq, id").fetchall()
    return [Quarantined(*r) for r in rows]
