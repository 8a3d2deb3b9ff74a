"""Inbound tasks: the seam between source workers and the task store.

Failed and skipped events are recorded *inside the batch's transaction*, so a task exists
exactly once for exactly the events that were not applied (a crash before commit records
neither the rows nor the tasks; the replay records both).

They go to the shared task store (``pipeline.tasks``, table ``dx.task``). Successful events are
counted per batch rather than written one row each: at 20k events/s a task row per success
would double the write load of the shop's database.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, Protocol

import psycopg

from pipeline.source.events import Failure
from pipeline.tasks.headers import encode_headers
from pipeline.tasks.keys import key_text
from pipeline.tasks.store import UPSERT, TaskRow
from pipeline.tasks.store import ensure_schema as store_ensure_schema


class TaskRecorder(Protocol):
    """Records the outcome of events that were not applied, in the caller's transaction."""

    def record(self, conn: psycopg.Connection[Any], route: str,
               failures: Sequence[Failure], attempts: Sequence[int] | None = None) -> None:
        """``attempts``: per failure, when it is a retry (default 1)."""


def _text(b: bytes | None) -> str | None:
    if b is None:
        return None
    try:
        text = b.decode("utf-8")
        if "\x00" not in text:  # jsonb cannot hold NUL
            return text
    except UnicodeDecodeError:
        pass
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


class StoreRecorder:
    """Writes to the shared task store (``dx.task``) with its upsert, in the batch's transaction
    (not through ``TaskWriter``'s own connection: the task must commit or roll back together
    with the rows and offsets of its batch).

    Dead tasks keep the raw message so ``dx tasks retry`` can redrive them through the route's
    current configuration. Unlike sink routes, a dead inbound event does not park later events
    of its key: applying a newer row is right whether or not an older one failed.
    """

    def record(self, conn: psycopg.Connection[Any], route: str,
               failures: Sequence[Failure], attempts: Sequence[int] | None = None) -> None:
        if not failures:
            return
        counts = attempts or [1] * len(failures)
        rows = [task_row(route, f, n).params() for f, n in zip(failures, counts, strict=True)]
        with conn.cursor() as cur:
            cur.executemany(UPSERT, rows)


def task_row(route: str, f: Failure, attempts: int = 1) -> TaskRow:
    m = f.message
    error = f"field {f.field!r}: {f.reason}" if f.field else f.reason
    keep = f.status == "dead"
    return TaskRow(
        route=route, topic=m.topic, partition=m.partition, offset=m.offset,
        status=f.status, key=key_text(f.key), event_id=f.event_id, op="apply",
        attempts=attempts, error=error, import_log=import_log(f),
        raw_key=m.key if keep else None, raw_value=m.value if keep else None,
        raw_headers=encode_headers(m.headers) if keep else None,
        dlq=None,
    )


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    store_ensure_schema(conn)


def recorder() -> TaskRecorder:
    """The task store source workers use (one place to switch stores)."""
    return StoreRecorder()
