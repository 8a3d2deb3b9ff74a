"""``dx init`` and ``dx capture install|uninstall|status``: dx's tables and per-table triggers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pipeline.capture import ddl
from pipeline.capture.catalog import read_table
from pipeline.capture.spec import TableSpec
from pipeline.config import DxConfig


def ensure_schema(conn: psycopg.Connection[Any], config: DxConfig) -> None:
    """Create dx's capture/relay tables and functions; safe to run any number of times."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (ddl.LEASE_LOCK_CLASS,))
        conn.execute(ddl.BASE_DDL)
        conn.execute(ddl.on_commit_ddl(config.capture.notify))


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
    """(Re)install capture triggers for ``config.tables[index]`` atomically."""
    table = config.tables[index]
    mode = table.capture or config.capture.mode
    with conn.transaction():
        spec = read_table(conn, config, index)
        version = spec_version(conn, spec)
        maker = ddl.row_function if mode == "row" else ddl.statement_function
        body = maker(spec, version).as_string(conn)
        for stmt in ddl.install_statements(spec, version, mode, body):
            conn.execute(stmt)
    return spec, version, mode


def uninstall_table(conn: psycopg.Connection[Any], config: DxConfig, index: int) -> TableSpec:
    with conn.transaction():
        spec = read_table(conn, config, index)
        for stmt in ddl.drop_triggers(spec):
            conn.execute(stmt)
        conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(ddl.function_name(spec)))
    return spec


@dataclass(frozen=True)
class CaptureState:
    entity: str
    installed: bool
    mode: str | None
    version: int | None
    current: bool  # installed spec equals what dx.yaml + catalog say now
    pending: int


def table_state(conn: psycopg.Connection[Any], config: DxConfig, index: int) -> CaptureState:
    spec = read_table(conn, config, index)
    triggers = {r[0] for r in conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname LIKE 'dx\\_%%'",
        (sql.Identifier(spec.schema, spec.table).as_string(conn),))}
    mode = "row" if "dx_capture" in triggers else (
        "statement" if "dx_capture_insert_stmt" in triggers else None)
    row = conn.execute("SELECT version, fingerprint FROM dx.capture_spec WHERE entity = %s "
                       "ORDER BY version DESC LIMIT 1", (spec.entity,)).fetchone()
    pending_row = conn.execute("SELECT count(*) FROM dx.outbox WHERE entity = %s",
                               (spec.entity,)).fetchone()
    return CaptureState(
        entity=spec.entity, installed=mode is not None, mode=mode,
        version=int(row[0]) if row else None,
        current=row is not None and row[1] == spec.fingerprint(),
        pending=int(pending_row[0]) if pending_row else 0,
    )
