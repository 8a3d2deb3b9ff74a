"""Inbound tasks: the seam between source workers and the task store.

Failed and skipped events are recorded *inside the batch's transaction*, so a task exists
exactly once for exactly the events that were not applied (a crash before commit records
neither the rows nor the tasks; the replay records both).

Until the shared task store (``pipeline.tasks``) lands, :class:`SourceTaskTable` keeps them in
``dx.source_tasks``; switching is this module only (:func:`recorder`). Successful events are
counted per batch rather than written one row each: at 20k events/s a task row per success
would double the write load of the shop's database.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb

from pipeline.source.events import Failure

DDL = """
CREATE SCHEMA IF NOT EXISTS dx;
CREATE TABLE IF NOT EXISTS dx.source_tasks (
    id          bigserial   PRIMARY KEY,
    route       text        NOT NULL,
    status      text        NOT NULL CHECK (status IN
                  ('pending', 'succeeded', 'failed', 'retrying', 'dead', 'skipped')),
    attempts    integer     NOT NULL DEFAULT 1,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    entity_key  jsonb,
    field       text,
    reason      text        NOT NULL,
    event_id    text,
    import_log  jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (route, topic, partition, "offset")
);
CREATE INDEX IF NOT EXISTS source_tasks_status ON dx.source_tasks (route, status, created_at);
"""


class TaskRecorder(Protocol):
    """Records the outcome of events that were not applied, in the caller's transaction."""

    def record(self, conn: psycopg.Connection[Any], route: str,
               failures: Sequence[Failure]) -> None: ...


def _text(b: bytes | None) -> str | None:
    if b is None:
        return None
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(b).decode()


def import_log(f: Failure) -> dict[str, Any]:
    """What was received (raw key/value/headers) and what dx made of it."""
    m = f.message
    return {
        "received": {
            "key": _text(m.key), "value": _text(m.value),
            "headers": {k: _text(v) for k, v in m.headers},
            "timestamp_ms": m.timestamp_ms,
        },
        "outcome": {"status": f.status, "field": f.field, "reason": f.reason},
    }


def key_json(key: tuple[Any, ...] | None) -> Jsonb | None:
    if key is None:
        return None
    return Jsonb(json.loads(json.dumps(list(key), default=str)))


class SourceTaskTable:
    """Interim store: ``dx.source_tasks`` (same statuses and fields as the shared store)."""

    def record(self, conn: psycopg.Connection[Any], route: str,
               failures: Sequence[Failure]) -> None:
        if not failures:
            return
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO dx.source_tasks (route, status, topic, partition, \"offset\", "
                "entity_key, field, reason, event_id, import_log) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (route, topic, partition, \"offset\") DO UPDATE SET "
                "status = excluded.status, reason = excluded.reason, field = excluded.field, "
                "attempts = dx.source_tasks.attempts + 1, updated_at = now()",
                [(route, f.status, f.message.topic, f.message.partition, f.message.offset,
                  key_json(f.key), f.field, f.reason, f.event_id, Jsonb(import_log(f)))
                 for f in failures],
            )


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('dx.source_tasks'))")
        for stmt in DDL.split(";"):
            if stmt.strip():
                conn.execute(stmt)


def recorder() -> TaskRecorder:
    """The task store source workers use (one place to switch to ``pipeline.tasks``)."""
    return SourceTaskTable()
