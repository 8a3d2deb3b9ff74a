"""The application outbox: write your own events in your own transaction.

Events use the Debezium outbox shape (``aggregatetype``, ``aggregateid``, ``type``, ``payload``)
and travel through the same relay as captured changes, ordered with them by commit. Any language
can do the same with ``SELECT dx.publish(aggregatetype, aggregateid, type, payload::jsonb)``.
Under logical capture ``dx.publish`` writes a transactional logical message instead of an outbox
row (nothing to purge); the events and topics are the same.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg


def publish(conn: psycopg.Connection[Any], aggregatetype: str, aggregateid: str | int,
            event_type: str, payload: Any, *, event_id: uuid.UUID | None = None) -> uuid.UUID:
    """Add one event to the outbox inside the caller's current transaction.

    Nothing is sent until that transaction commits; if it rolls back, the event never existed.
    The returned ``event_id`` is the idempotency key consumers see.
    """
    eid = event_id or uuid.uuid4()
    conn.execute("SELECT dx.publish(%s, %s, %s, %s::jsonb, %s)",
                 (aggregatetype, str(aggregateid), event_type,
                  json.dumps(payload, default=str), eid))
    return eid
