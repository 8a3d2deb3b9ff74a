"""``dx init`` and ``dx capture install|uninstall|status``: dx's tables and per-table triggers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pipeline.capture import ddl, logical
from pipeline.capture.catalog import capture_mode, partitions, read_table
from pipeline.capture.spec import TableSpec
from pipeline.config import DxConfig
from pipeline.errors import CatalogError


def ensure_schema(conn: psycopg.Connection[Any], config: DxConfig) -> None:
    """Create dx's capture/relay tables and functions; safe to run any number of times."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (ddl.LEASE_LOCK_CLASS,))
        conn.execute(ddl.BASE_DDL)
        conn.execute(ddl.on_commit_ddl(config.capture.notify))
        conn.execute(logical.SLOT_DDL)


def spec_version(conn: psycopg.Connection[Any], spec: TableSpec) -> int:
    """The version number of this spec in dx.capture_spec, adding a new one if it changed."""
    fp = spec.fingerprint()
    row = conn.execute(
        "SELECT version, fingerprint FROM dx.capture_spec WHERE entity = %s "
        "ORDER BY version DESC LIMIT 1", (spec.entity,)).fetchone()
    if row and row[1] == fp:
        return int(row[0])
    version = int(row[0]) + 1 if row else 1
    conn.execute("INSERT INTO dx.capture_spec (entity, version, spec, fingerprint) "
                 "VALUES (%s, %s, %s, %s)",
                 (spec.entity, version, json.dumps(spec.to_json()), fp))
    return version


def load_spec(conn: psycopg.Connection[Any], entity: str, version: int) -> TableSpec:
    row = conn.execute("SELECT spec FROM dx.capture_spec WHERE entity = %s AND version = %s",
                       (entity, version)).fetchone()
    if row is None:
        raise KeyError(f"no capture spec {entity} v{version}")
    data = row[0] if isinstance(row[0], dict) else json.loads(row[0])
    return TableSpec.from_json(data)


def install_table(conn: psycopg.Connection[Any], config: DxConfig, index: int) -> tuple[
        TableSpec, int, str]:
    """(Re)install capture triggers for ``config.tables[index]`` atomically.

    A partitioned table's row triggers are cloned by PostgreSQL to every partition, now and
    later; its TRUNCATE guard is installed on each current partition here, so a partition
    attached later needs another install (``table_state`` reports it until then)."""
    mode = capture_mode(config, index)
    with conn.transaction():
        spec = read_table(conn, config, index)
        # the lock DROP TRIGGER takes anyway, taken first: no partition can be attached or
        # created between reading the partitions and guarding them
        conn.execute(sql.SQL("LOCK TABLE ONLY {} IN ACCESS EXCLUSIVE MODE").format(
            sql.Identifier(spec.schema, spec.table)))
        parts = partitions(conn, spec.schema, spec.table)
        logical.leave(conn, spec)
        version = spec_version(conn, spec)
        maker = ddl.row_function if mode == "row" else ddl.statement_function
        body = maker(spec, version).as_string(conn)
        for stmt in ddl.install_statements(spec, version, mode, body, parts):
            conn.execute(stmt)
    return spec, version, mode


def uninstall_table(conn: psycopg.Connection[Any], config: DxConfig, index: int) -> TableSpec:
    with conn.transaction():
        spec = read_table(conn, config, index, check_capture=False)
        for stmt in ddl.drop_triggers(spec, partitions(conn, spec.schema, spec.table)):
            conn.execute(stmt)
        conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(ddl.function_name(spec)))
        logical.leave(conn, spec)
    return spec


@dataclass(frozen=True)
class InactiveTrigger:
    """A dx trigger that does not fire for every write (disabled, or left at PostgreSQL's
    default, which skips sessions under ``session_replication_role = replica``)."""

    schema: str
    table: str
    trigger: str
    enabled: str  # pg_trigger.tgenabled: D disabled, O origin/local only, R replica only

    def problem(self) -> str:
        where = f"{self.schema}.{self.table}"
        if self.trigger == "dx_refuse_truncate":
            lost = f"a TRUNCATE of {where} is not refused and never reaches Kafka"
        elif self.schema == "dx":
            lost = "captured transactions get no commit number and are never published"
        else:
            lost = f"changes to {where} are not captured"
        if self.enabled == "D":
            return (f"trigger {self.trigger} on {where} is disabled: {lost}; run 'dx capture "
                    f"install' (or ALTER TABLE {where} ENABLE ALWAYS TRIGGER {self.trigger})")
        return (f"trigger {self.trigger} on {where} does not fire in every session "
                f"(tgenabled {self.enabled!r}; writes under session_replication_role = replica, "
                f"as pg_restore and ETL tools do, skip it): {lost} in those sessions; run "
                "'dx capture install' (it sets ENABLE ALWAYS)")


def inactive_triggers(conn: psycopg.Connection[Any]) -> list[InactiveTrigger]:
    """Every dx trigger in the database that does not fire for every write."""
    return [InactiveTrigger(*r) for r in conn.execute(ddl.INACTIVE_TRIGGERS)]


@dataclass(frozen=True)
class CaptureState:
    entity: str
    installed: bool
    mode: str | None
    version: int | None
    current: bool  # installed spec equals what dx.yaml + catalog say now, and nothing below
    pending: int
    problems: tuple[str, ...] = ()  # why the installed capture falls short, one line each
    #: triggers that miss some sessions' writes (``dx capture status`` fails on them; a
    #: snapshot does not, its changes are captured)
    warnings: tuple[str, ...] = ()


def table_state(conn: psycopg.Connection[Any], config: DxConfig, index: int) -> CaptureState:
    problems: list[str] = []
    try:
        spec = read_table(conn, config, index)
    except CatalogError as err:  # capturable as a table, not in its configured mode
        spec = read_table(conn, config, index, check_capture=False)
        problems.append(str(err))
    triggers = {r[0] for r in conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname LIKE 'dx\\_%%'",
        (sql.Identifier(spec.schema, spec.table).as_string(conn),))}
    mode = "row" if "dx_capture" in triggers else (
        "statement" if "dx_capture_insert_stmt" in triggers else None)
    in_publication = logical.published(conn, spec)
    if mode is None and in_publication:
        mode = "logical"
        problems += logical.table_problems(conn, spec)
    elif mode is not None and in_publication:
        problems.append(f"{spec.entity}: captured by triggers and by the publication (changes "
                        "would be published twice); run 'dx capture install'")
    try:
        resolved, _ = logical.resolve_mode(conn, config)
    except CatalogError as err:
        resolved = "logical"
        problems.append(str(err))
    wanted = "logical" if resolved == "logical" else capture_mode(config, index)
    if mode is not None and mode != wanted:
        problems.append(f"{spec.entity}: installed as {mode} capture but dx.yaml says {wanted}; "
                        "run 'dx capture install'")
    if mode is not None:
        guarded = {(r[0], r[1]) for r in conn.execute(
            "SELECT n.nspname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE t.tgname = 'dx_refuse_truncate' AND c.relispartition")}
        bare = [f"{s}.{n}" for s, n in partitions(conn, spec.schema, spec.table)
                if (s, n) not in guarded]
        if bare:
            problems.append(f"{spec.entity}: partition(s) {', '.join(bare)} lack dx's TRUNCATE "
                            "guard (attached or created after the last 'dx capture install'); run "
                            "'dx capture install' again")
    warnings: list[str] = []
    if mode is not None:
        mine = {(spec.schema, spec.table), *partitions(conn, spec.schema, spec.table)}
        for t in inactive_triggers(conn):
            if (t.schema, t.table) in mine:
                # disabled: nothing is captured; origin-only: replica-role sessions are missed
                (problems if t.enabled == "D" else warnings).append(t.problem())
    row = conn.execute("SELECT version, fingerprint FROM dx.capture_spec WHERE entity = %s "
                       "ORDER BY version DESC LIMIT 1", (spec.entity,)).fetchone()
    pending_row = conn.execute("SELECT count(*) FROM dx.outbox WHERE entity = %s",
                               (spec.entity,)).fetchone() if mode != "logical" else None
    return CaptureState(
        entity=spec.entity, installed=mode is not None, mode=mode,
        version=int(row[0]) if row else None,
        current=row is not None and row[1] == spec.fingerprint() and not problems,
        pending=int(pending_row[0]) if pending_row else 0,
        problems=tuple(problems), warnings=tuple(warnings),
    )
