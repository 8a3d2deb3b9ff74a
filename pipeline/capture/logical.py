"""Logical capture: the publication, the replication slot and the per-table settings it needs.

In logical mode PostgreSQL's own change stream is the capture: the relay reads the slot with the
``pgoutput`` plugin (see :mod:`pipeline.relay.stream`). ``dx capture install`` therefore only

* adds the table to the publication ``dx_capture`` (``publish_via_partition_root``, so a
  partitioned table's changes arrive under its own name), creating the publication first;
* sets ``REPLICA IDENTITY FULL`` on it and its partitions, so updates and deletes carry the whole
  old row (the ``before`` image, unchanged TOASTed values, key changes);
* removes the capture triggers and keeps only the TRUNCATE guard;
* creates the slot after the publication (pgoutput refuses to decode WAL older than the
  publication), and records a fresh *epoch* for it in ``dx.capture_slot``.

The epoch names one slot's history: event ids are derived from (epoch, commit LSN, ordinal), so
they are the same on every replay of that slot and never repeat after a restore or fail-over,
where LSNs can repeat but the slot has to be created again (which draws a new epoch).

The publication is also the database's own record of the mode: ``dx.publish()`` writes a
transactional logical message while it exists, an outbox row otherwise.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pipeline.capture import ddl
from pipeline.capture.catalog import partitions, read_table
from pipeline.capture.spec import TableSpec
from pipeline.config import DxConfig
from pipeline.errors import CatalogError

PUBLICATION = "dx_capture"
#: prefixes of the transactional logical messages dx writes (origin, outbox, snapshot rows)
ORIGIN_PREFIX = "dx.origin"
OUTBOX_PREFIX = "dx.outbox"
SNAPSHOT_PREFIX = "dx.snapshot"
SPEC_PREFIX = "dx.spec"

SLOT_DDL = """
CREATE TABLE IF NOT EXISTS dx.capture_slot (
    slot_name text PRIMARY KEY,
    epoch uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    confirmed_lsn pg_lsn,
    confirmed_at timestamptz
);
"""


def slot_name(database: str) -> str:
    """The slot of one database. Slots are cluster-wide, so the name carries the database's
    (sanitised, with a hash against collisions); one active relay per database reads it."""
    clean = re.sub(r"[^a-z0-9_]", "_", database.lower())[:40]
    return f"dx_{clean}_{hashlib.sha256(database.encode()).hexdigest()[:8]}"


def current_slot(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    return slot_name(str(row[0]))


# -- which mode ---------------------------------------------------------------------------------

def logical_unavailable(conn: psycopg.Connection[Any]) -> str | None:
    """Why logical capture cannot run here (None when it can): wal_level and the role."""
    row = conn.execute(
        "SELECT current_setting('wal_level'), r.rolname, r.rolreplication OR r.rolsuper "
        "FROM pg_roles r WHERE r.rolname = current_user").fetchone()
    assert row is not None
    wal_level, role, may_replicate = row
    if wal_level != "logical":
        return f"wal_level is {wal_level}, logical capture needs wal_level=logical"
    if not may_replicate:
        return f"role {role} may not replicate (ALTER ROLE {role} REPLICATION)"
    return None


def resolve_mode(conn: psycopg.Connection[Any], config: DxConfig) -> tuple[str, str]:
    """(``logical`` or ``trigger``, why) for ``capture.mode``; CatalogError when ``logical`` is
    configured and the database cannot do it."""
    wanted = config.capture.mode
    if wanted == "trigger":
        return "trigger", "capture.mode: trigger"
    reason = logical_unavailable(conn)
    if wanted == "logical":
        if reason is not None:
            file, line = config.where("capture", "mode")
            raise CatalogError(f"{file}:{line}: capture.mode is logical but {reason}" if line
                               else f"{file}: capture.mode is logical but {reason}")
        return "logical", "capture.mode: logical"
    if reason is None:
        return "logical", "auto: wal_level=logical and the role may replicate"
    return "trigger", f"auto: {reason}"


def installed_mode(conn: psycopg.Connection[Any]) -> str:
    """``logical`` when dx's publication exists in this database, else ``trigger``."""
    row = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                       (PUBLICATION,)).fetchone()
    return "logical" if row else "trigger"


# -- install ------------------------------------------------------------------------------------

def _relations(spec: TableSpec,
               parts: tuple[tuple[str, str], ...]) -> list[sql.Identifier]:
    return [sql.Identifier(spec.schema, spec.table), *(sql.Identifier(*p) for p in parts)]


def install_table(conn: psycopg.Connection[Any], config: DxConfig, index: int) -> tuple[
        TableSpec, int]:
    """Put ``config.tables[index]`` under logical capture, atomically (see the module doc);
    the slot is created afterwards by :func:`ensure_slot`."""
    from pipeline.capture.install import spec_version

    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (ddl.LEASE_LOCK_CLASS,))
        pending = conn.execute("SELECT count(*) FROM dx.outbox").fetchone()
        if pending and pending[0] and installed_mode(conn) == "trigger":
            raise CatalogError(
                f"{pending[0]} change(s) captured by triggers are still in dx.outbox; let the "
                "relay publish them (dx status shows the backlog) before switching to logical "
                "capture, or they would be left behind")
        spec = read_table(conn, config, index)
        table = sql.Identifier(spec.schema, spec.table)
        conn.execute(sql.SQL("LOCK TABLE ONLY {} IN ACCESS EXCLUSIVE MODE").format(table))
        parts = partitions(conn, spec.schema, spec.table)
        version = spec_version(conn, spec)
        for stmt in ddl.drop_triggers(spec, parts):
            conn.execute(stmt)
        conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(ddl.function_name(spec)))
        for stmt in ddl.truncate_guards(spec, parts):
            conn.execute(stmt)
        for rel in _relations(spec, parts):
            conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(rel))
        if installed_mode(conn) == "trigger":
            conn.execute(sql.SQL("CREATE PUBLICATION {}").format(sql.Identifier(PUBLICATION)))
        # truncates too: the guard refuses them, but not once someone disabled it, and the
        # relay must say so rather than let consumers keep the rows
        conn.execute(sql.SQL(
            "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate', "
            "publish_via_partition_root = true)").format(sql.Identifier(PUBLICATION)))
        if not published(conn, spec):
            conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                sql.Identifier(PUBLICATION), table))
        # the relay applies the new spec to exactly the changes committed after this one
        conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", (SPEC_PREFIX, spec.entity))
    return spec, version


def published(conn: psycopg.Connection[Any], spec: TableSpec) -> bool:
    """Whether the table is in dx's publication."""
    return conn.execute(
        "SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid "
        "JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE p.pubname = %s AND n.nspname = %s AND c.relname = %s",
        (PUBLICATION, spec.schema, spec.table)).fetchone() is not None


def ensure_slot(conn: psycopg.Connection[Any]) -> tuple[str, bool]:
    """Create the slot when missing (after the publication exists); (name, created).

    An invalidated slot (``max_slot_wal_keep_size`` reached) can never be read again: it is
    dropped and created anew, with a new epoch (the runbook 'lost replication slot' goes on
    with a snapshot). ``conn`` must be in autocommit: a slot cannot be created in a
    transaction that wrote."""
    name = current_slot(conn)
    info = slot_info(conn)
    if info is not None and info.lost and not info.active:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
    elif info is not None:
        return name, False
    try:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
    except psycopg.errors.ConfigurationLimitExceeded:
        raise CatalogError(f"cannot create replication slot {name}: all replication slots are "
                           "in use; drop an unused one (pg_replication_slots) or raise "
                           "max_replication_slots (and max_wal_senders)") from None
    except psycopg.errors.InsufficientPrivilege as err:
        raise CatalogError(f"cannot create replication slot {name}: {err.diag.message_primary}"
                           "; the role needs REPLICATION") from None
    conn.execute("INSERT INTO dx.capture_slot (slot_name, epoch) VALUES (%s, %s) "
                 "ON CONFLICT (slot_name) DO UPDATE SET epoch = EXCLUDED.epoch, "
                 "created_at = now(), confirmed_lsn = NULL, confirmed_at = NULL",
                 (name, uuid.uuid4()))
    return name, True


def leave(conn: psycopg.Connection[Any], spec: TableSpec) -> None:
    """Take the table out of logical capture (trigger install, uninstall); when no table is
    left, drop the publication and an inactive slot so no WAL is retained for nothing."""
    if installed_mode(conn) == "trigger":
        return
    if published(conn, spec):
        conn.execute(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
            sql.Identifier(PUBLICATION), sql.Identifier(spec.schema, spec.table)))
    left = conn.execute(
        "SELECT count(*) FROM pg_publication_rel pr JOIN pg_publication p "
        "ON p.oid = pr.prpubid WHERE p.pubname = %s", (PUBLICATION,)).fetchone()
    if left and left[0] == 0:
        conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(PUBLICATION)))


def drop_slot(conn: psycopg.Connection[Any]) -> bool:
    """Drop the slot when the publication is gone and no relay reads it; True if dropped."""
    info = slot_info(conn)
    if info is None or info.active or installed_mode(conn) == "logical":
        return False
    conn.execute("SELECT pg_drop_replication_slot(%s)", (info.name,))
    return True


# -- state --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SlotInfo:
    name: str
    active: bool
    wal_status: str | None  # reserved, extended, unreserved, lost
    retained_bytes: int | None  # WAL kept for the slot (from restart_lsn)
    unconfirmed_bytes: int | None  # WAL written since the relay last confirmed
    confirmed_age_s: float | None  # since the relay last confirmed (dx.capture_slot)
    epoch: str | None

    @property
    def lost(self) -> bool:
        return self.wal_status == "lost"


def slot_info(conn: psycopg.Connection[Any]) -> SlotInfo | None:
    name = current_slot(conn)
    row = conn.execute(
        "SELECT s.active, s.wal_status, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint "
        "FROM pg_replication_slots s WHERE s.slot_name = %s", (name,)).fetchone()
    if row is None:
        return None
    extra = conn.execute(
        "SELECT epoch::text, extract(epoch FROM now() - COALESCE(confirmed_at, created_at)) "
        "FROM dx.capture_slot WHERE slot_name = %s", (name,)).fetchone()
    return SlotInfo(name=name, active=bool(row[0]), wal_status=row[1],
                    retained_bytes=None if row[2] is None else int(row[2]),
                    unconfirmed_bytes=None if row[3] is None else int(row[3]),
                    confirmed_age_s=None if not extra or extra[1] is None else float(extra[1]),
                    epoch=extra[0] if extra else None)


def mark_confirmed(conn: psycopg.Connection[Any], slot: str, lsn: int) -> None:
    """Record when the relay last confirmed the slot (``dx status`` shows the age)."""
    conn.execute("UPDATE dx.capture_slot SET confirmed_lsn = %s::pg_lsn, confirmed_at = now() "
                 "WHERE slot_name = %s", (f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}", slot))


def table_problems(conn: psycopg.Connection[Any], spec: TableSpec) -> list[str]:
    """What keeps a logically captured table from being captured completely."""
    problems: list[str] = []
    for rel in (spec.schema, spec.table), *partitions(conn, spec.schema, spec.table):
        row = conn.execute(
            "SELECT c.relreplident, c.relkind FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s", rel).fetchone()
        if row and row[1] != "p" and row[0] != "f":
            problems.append(f"{rel[0]}.{rel[1]}: REPLICA IDENTITY is not FULL (before images "
                            "and unchanged large values would be missing); run "
                            "'dx capture install'")
    if slot_info(conn) is None:
        problems.append(f"replication slot {current_slot(conn)} is missing; see the README's "
                        "runbook 'lost replication slot'")
    return problems
