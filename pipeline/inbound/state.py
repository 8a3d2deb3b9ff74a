"""dx's tables for inbound kinds (schema ``dx``):

``dx.inbound_state``    one row per route and kind: the pull cursor and what ``dx status``
                        shows (last run, pages, entities, errors, files done and failed).
``dx.inbound_request``  webhook idempotency: a request key (the ``Idempotency-Key`` header, or
                        with ``id_fields`` the hash of the request's event ids) claimed before
                        producing and marked accepted after Kafka acknowledged, so a re-sent
                        webhook is answered without producing again; ``fingerprint`` (that
                        hash) refuses a key reused for other entities. Purged after a week.
``dx.inbound_file``     file drops by content hash: a file dropped twice is processed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from pipeline.tasks.store import ensure_schema as tasks_schema

DDL = """
CREATE SCHEMA IF NOT EXISTS dx;
CREATE TABLE IF NOT EXISTS dx.inbound_state (
    route        text        NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('webhook', 'pull', 'files')),
    cursor       text,
    last_run_at  timestamptz,
    last_ok_at   timestamptz,
    pages        bigint      NOT NULL DEFAULT 0,
    entities     bigint      NOT NULL DEFAULT 0,
    requests     bigint      NOT NULL DEFAULT 0,
    refused      bigint      NOT NULL DEFAULT 0,
    errors       bigint      NOT NULL DEFAULT 0,
    files_done   bigint      NOT NULL DEFAULT 0,
    files_failed bigint      NOT NULL DEFAULT 0,
    last_error   text,
    last_error_at timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (route, kind)
);
CREATE TABLE IF NOT EXISTS dx.inbound_request (
    route       text        NOT NULL,
    key         text        NOT NULL,
    state       text        NOT NULL CHECK (state IN ('pending', 'accepted')),
    entities    integer     NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (route, key)
);
ALTER TABLE dx.inbound_request ADD COLUMN IF NOT EXISTS fingerprint text;
CREATE INDEX IF NOT EXISTS inbound_request_claimed_idx ON dx.inbound_request (claimed_at);
CREATE TABLE IF NOT EXISTS dx.inbound_file (
    route        text        NOT NULL,
    sha256       text        NOT NULL,
    name         text        NOT NULL,
    status       text        NOT NULL CHECK (status IN ('done', 'failed')),
    rows         integer     NOT NULL DEFAULT 0,
    rejected     integer     NOT NULL DEFAULT 0,
    error        text,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (route, sha256)
);
"""


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the inbound tables and the task table (idempotent; every inbound command calls
    it)."""
    tasks_schema(conn)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('dx.inbound ensure_schema'))")
        for stmt in DDL.split(";"):
            if stmt.strip():
                conn.execute(stmt)


@dataclass
class Counts:
    """Increments of one route/kind row (added, never overwritten: several processes)."""

    pages: int = 0
    entities: int = 0
    requests: int = 0
    refused: int = 0
    errors: int = 0
    files_done: int = 0
    files_failed: int = 0

    def any(self) -> bool:
        return any(vars(self).values())


def record(conn: psycopg.Connection[Any], route: str, kind: str, counts: Counts, *,
           cursor: str | None = None, set_cursor: bool = False, ok: bool | None = None,
           error: str | None = None) -> None:
    """Add ``counts`` to the row of (route, kind) in the caller's transaction; ``ok`` stamps a
    run (True: successful, False: failed with ``error``); ``set_cursor`` stores ``cursor``."""
    if error is not None:  # a third party's answer quoted in it may hold NUL, which text refuses
        error = error.replace("\x00", "\\0")
    conn.execute(
        """
        INSERT INTO dx.inbound_state AS s (route, kind, cursor, last_run_at, last_ok_at, pages,
            entities, requests, refused, errors, files_done, files_failed, last_error,
            last_error_at)
        VALUES (%(route)s, %(kind)s, %(cursor)s::text,
            CASE WHEN %(ok)s::boolean IS NULL THEN NULL ELSE now() END,
            CASE WHEN %(ok)s::boolean THEN now() END, %(pages)s, %(entities)s, %(requests)s,
            %(refused)s, %(errors)s, %(files_done)s, %(files_failed)s, %(error)s::text,
            CASE WHEN %(error)s::text IS NOT NULL THEN now() END)
        ON CONFLICT (route, kind) DO UPDATE SET
            cursor = CASE WHEN %(set_cursor)s::boolean THEN %(cursor)s::text ELSE s.cursor END,
            last_run_at = CASE WHEN %(ok)s::boolean IS NULL THEN s.last_run_at ELSE now() END,
            last_ok_at = CASE WHEN %(ok)s::boolean THEN now() ELSE s.last_ok_at END,
            pages = s.pages + %(pages)s, entities = s.entities + %(entities)s,
            requests = s.requests + %(requests)s, refused = s.refused + %(refused)s,
            errors = s.errors + %(errors)s, files_done = s.files_done + %(files_done)s,
            files_failed = s.files_failed + %(files_failed)s,
            last_error = COALESCE(%(error)s::text, s.last_error),
            last_error_at = CASE WHEN %(error)s::text IS NOT NULL THEN now()
                                 ELSE s.last_error_at END,
            updated_at = now()
        """,
        {"route": route, "kind": kind, "cursor": cursor, "set_cursor": set_cursor, "ok": ok,
         "error": error, **vars(counts)})


def load_cursor(conn: psycopg.Connection[Any], route: str) -> str | None:
    row = conn.execute("SELECT cursor FROM dx.inbound_state WHERE route = %s AND kind = 'pull'",
                       (route,)).fetchone()
    return None if row is None else row[0]
