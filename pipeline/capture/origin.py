"""Marking a transaction with the system that caused it, so no route sends it back (no echo).

One call at the start of the transaction covers both capture modes:

* ``dx.origin`` is set transaction-locally; trigger capture and ``dx.publish()`` record it;
* where the WAL is logical, a *transactional* logical message ``dx.origin`` is written too. It
  travels in the change stream inside the same transaction, ahead of the changes that follow it,
  and vanishes with a rollback. The relay tags every later change of that transaction with it.

A message was chosen over a replication origin: it needs no privilege (replication origins
need superuser or an explicit grant per function), no per-system setup, and it marks exactly
the changes that follow it, as the setting does in trigger mode.
"""

from __future__ import annotations

from typing import Any

import psycopg

_MARK = ("SELECT set_config('dx.origin', %(o)s, true), "
         "CASE WHEN current_setting('wal_level') = 'logical' "
         "THEN pg_logical_emit_message(true, 'dx.origin', %(o)s) END")


def mark_origin(conn: psycopg.Connection[Any], origin: str) -> None:
    """Tag the changes this transaction makes from here on with ``origin`` (one round trip)."""
    conn.execute(_MARK, {"o": origin})
