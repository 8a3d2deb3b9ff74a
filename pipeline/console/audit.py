"""The audit trail: who did what to which task, route, user or token, and when. Written in the
same transaction as the action, so an action without its audit row cannot happen."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb


def record(conn: psycopg.Connection[Any], actor: str, action: str, subject_kind: str,
           subjects: Sequence[str], detail: dict[str, Any] | None = None) -> None:
    """One row per subject (a bulk retry of 500 tasks shows on each task's page). Does not
    commit: the caller commits the action and its audit together."""
    if not subjects:
        return
    conn.execute(
        "INSERT INTO dx.console_audit (actor, action, subject_kind, subject, detail) "
        "SELECT %s, %s, %s, s, %s FROM unnest(%s::text[]) AS s",
        (actor, action, subject_kind, None if detail is None else Jsonb(detail),
         list(subjects)))


def entries(conn: psycopg.Connection[Any], subject_kind: str | None = None,
            subject: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Newest first; all of them, or those of one subject."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT id, at, actor, action, subject_kind, subject, detail "
                    "FROM dx.console_audit WHERE (%s::text IS NULL OR subject_kind = %s) "
                    "AND (%s::text IS NULL OR subject = %s) ORDER BY id DESC LIMIT %s",
                    (subject_kind, subject_kind, subject, subject, limit))
        rows = list(cur.fetchall())
    conn.commit()
    return rows
