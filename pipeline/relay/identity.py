"""Is this the database the relay was following, or a restored / promoted / copied one?

In exactly-once mode the relay's cursor lives in Kafka and ``dx.relay_state`` records how far
the database knows it was published. After a crash between Kafka's commit and the outbox delete,
Kafka is ahead by one batch and the rows in between are the ones Kafka already has: deleting them
is right. After a restore from a backup (or a fail-over to an asynchronous replica) Kafka is
ahead too, but the database's commit sequence restarted from the backup's value, so the numbers
between the two cursors may belong to new, never-published changes: deleting them would lose
them without a word.

What tells the two apart is an identity recorded with the cursor that every such event changes:

* the system identifier (a different cluster: ``pg_dump`` into another server, ``initdb``);
* the timeline (point-in-time recovery and replica promotion both start a new one);
* the database's oid (``pg_restore`` into a new database, ``CREATE DATABASE ... TEMPLATE``);
* the oid of ``dx.relay_state`` itself (``pg_restore --clean`` into the same database recreates
  the table).

A dump restored into another cluster also brings transaction ids that cluster hands out again:
:mod:`pipeline.relay.foreign_xids` keeps them apart.

The one event it cannot see is a cold file-level copy put back in place on the same timeline;
the runbook says to start the relay with ``--reset-state`` after one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg

from pipeline.errors import TerminalError
from pipeline.relay import foreign_xids
from pipeline.relay.reader import Cursor

log = logging.getLogger(__name__)

_CURRENT = """
SELECT (SELECT system_identifier FROM pg_control_system()),
       ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint,
       (SELECT oid FROM pg_database WHERE datname = current_database()),
       'dx.relay_state'::regclass::oid
"""

RESET_HINT = ("check what reached Kafka, then start once with 'dx relay --reset-state' to "
              "publish every pending outbox row (consumers de-duplicate by event_id)")


class DatabaseReplaced(TerminalError):
    """The database was restored, copied or promoted after Kafka got changes it no longer
    has a record of: resuming from Kafka's cursor could delete unpublished changes."""


@dataclass(frozen=True)
class DatabaseIdentity:
    system: int
    timeline: int
    database_oid: int
    state_table_oid: int

    @property
    def token(self) -> str:
        return f"{self.system}/{self.timeline}/{self.database_oid}/{self.state_table_oid}"


def current(conn: psycopg.Connection[Any]) -> DatabaseIdentity:
    row = conn.execute(_CURRENT).fetchone()
    conn.commit()
    assert row is not None
    return DatabaseIdentity(int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def recorded(conn: psycopg.Connection[Any], relay_name: str) -> tuple[Cursor, str | None]:
    """The cursor this database last recorded as published, and the identity it was
    recorded under (None before dx recorded identities)."""
    row = conn.execute("SELECT seq, id, identity FROM dx.relay_state WHERE name = %s",
                       (relay_name,)).fetchone()
    conn.commit()
    if row is None:
        return Cursor(), None
    return Cursor(int(row[0]), int(row[1])), row[2]


def settle(conn: psycopg.Connection[Any], relay_name: str, kafka_cursor: Cursor | None) -> None:
    """Check the database against the cursor the relay is about to resume from, then record
    its identity. ``kafka_cursor`` is the exactly-once cursor read from Kafka, None where the
    relay resumes from the database's own cursor (at-least-once, ``--reset-state``), which a
    restore cannot make unsafe: rows after it are published again, with their event_ids.

    Raises DatabaseReplaced (one line) when the identity changed and Kafka holds a cursor
    beyond what this database recorded as published."""
    here = current(conn)
    db_cursor, token = recorded(conn, relay_name)
    other_cluster = token is not None and token.split("/", 1)[0] != str(here.system)
    if other_cluster or foreign_xids.from_elsewhere(conn):
        foreign_xids.rebase(conn, relay_name)  # before anything is read or deleted
    else:
        foreign_xids.check(conn, relay_name)
    if token is not None and token != here.token:
        if kafka_cursor is not None and kafka_cursor > db_cursor:
            raise DatabaseReplaced(
                f"relay {relay_name}: this database (identity {here.token}) is not the one the "
                f"relay published from (identity {token}: restored, copied or promoted since), "
                f"and Kafka's cursor (commit {kafka_cursor.seq}) is ahead of what it recorded "
                f"as published (commit {db_cursor.seq}): the commits in between may be new "
                f"changes; {RESET_HINT}")
        log.warning("relay %s: the database was restored, copied or promoted (identity %s, "
                    "was %s); resuming from commit %d, which it recorded as published",
                    relay_name, here.token, token, db_cursor.seq)
    with conn.transaction():
        conn.execute(
            "INSERT INTO dx.relay_state (name, seq, id, identity) VALUES (%s, 0, 0, %s) "
            "ON CONFLICT (name) DO UPDATE SET identity = EXCLUDED.identity",
            (relay_name, here.token))
