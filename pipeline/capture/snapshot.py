"""``dx snapshot TABLE``: initial load / backfill as ``op=r`` events through the outbox.

Each chunk is one transaction. It first picks the chunk's upper bound without locking anything:
the ``chunk``-th key after the last one, ordered by the real key columns (their types, their
collations). It then copies every row with ``last < key <= bound`` into the outbox, read
``FOR SHARE``: the chunk waits for in-flight writers of those rows and blocks new ones until it
commits, so a snapshot row never overtakes a newer change of the same key (the outbox is ordered
by commit, see :mod:`pipeline.capture.ddl`). A row whose key a concurrent transaction moves out
of the range is dropped by PostgreSQL's re-check of the ``WHERE`` clause; the capture trigger has
already queued its ``d``/``c`` events, and a key moved upwards is copied again by a later chunk.
The next chunk starts after the bound, never after a key a concurrent update just wrote, so no
row is skipped. When fewer than ``chunk`` rows are left there is no bound and the rest is copied.

The bound is stored in ``dx.snapshot_progress`` in the same transaction as the copied rows, as
each key column's text form, so an interrupted snapshot resumes where it stopped. It is handed
back as untyped parameters compared with the key columns, so PostgreSQL resolves each to the
column's own type (an enum or domain in any schema) and compares with the column's collation.

The snapshot never changes the triggers: it uses the installed spec version and refuses to run
when capture is missing or out of date with dx.yaml and the catalog.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from psycopg import sql

from pipeline.capture import ddl
from pipeline.capture.install import load_spec, table_state
from pipeline.capture.logical import SNAPSHOT_PREFIX, installed_mode
from pipeline.capture.spec import TableSpec
from pipeline.config import DxConfig
from pipeline.errors import CatalogError


def snapshot_table(conn: psycopg.Connection[Any], config: DxConfig, index: int, *,
                   chunk: int = 5000, restart: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> int:
    """Copy every row of ``config.tables[index]`` into the outbox; returns rows copied.

    ``conn`` must be in autocommit mode so that each chunk commits on its own."""
    spec, version = installed_spec(conn, config, index)
    stream = installed_mode(conn) == "logical"
    total_row = conn.execute(
        "SELECT c.reltuples::bigint FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (spec.schema, spec.table)).fetchone()
    estimate = max(0, int(total_row[0])) if total_row else 0
    with conn.transaction():
        if restart:
            conn.execute("DELETE FROM dx.snapshot_progress WHERE entity = %s", (spec.entity,))
        row = conn.execute("SELECT last_key, rows, finished_at FROM dx.snapshot_progress "
                           "WHERE entity = %s", (spec.entity,)).fetchone()
        last_key: Mapping[str, Any] | None
        if row is None or row[2] is not None:
            conn.execute("INSERT INTO dx.snapshot_progress (entity) VALUES (%s) "
                         "ON CONFLICT (entity) DO UPDATE SET last_key = NULL, rows = 0, "
                         "started_at = now(), finished_at = NULL", (spec.entity,))
            last_key, done = None, 0
        else:
            last_key, done = row[0], int(row[1])
    while True:
        with conn.transaction():
            if not stream:
                conn.execute("SELECT dx.mark_txn()")
            after = {} if last_key is None else _key_params("a", spec, last_key)
            found = conn.execute(_bound_sql(spec, chunk, after=last_key is not None),
                                 after).fetchone()
            bound: Mapping[str, Any] | None = found[0] if found else None
            upto = {} if bound is None else _key_params("b", spec, bound)
            res = conn.execute(_copy_sql(spec, version, after=last_key is not None,
                                         upto=bound is not None, stream=stream),
                               {**after, **upto}).fetchone()
            done += int(res[0]) if res else 0
            if bound is not None:
                last_key = bound
            conn.execute("UPDATE dx.snapshot_progress SET last_key = %s, rows = %s, "
                         "finished_at = CASE WHEN %s THEN now() END WHERE entity = %s",
                         (json.dumps(last_key), done, bound is None, spec.entity))
        if progress:
            progress(done, max(estimate, done))
        if bound is None:
            return done


def installed_spec(conn: psycopg.Connection[Any], config: DxConfig,
                   index: int) -> tuple[TableSpec, int]:
    """The spec and version the installed triggers of ``config.tables[index]`` use.

    CatalogError (one line) when capture is not installed or differs from what dx.yaml and the
    catalog say now: the snapshot's rows must have the shape of the changes captured alongside
    them, and reinstalling here would take ACCESS EXCLUSIVE and apply dx.yaml edits unasked."""
    state = table_state(conn, config, index)
    if not state.installed or state.version is None:
        raise CatalogError(f"capture is not installed on {state.entity}; run "
                           "'dx capture install' first so changes during the snapshot are kept")
    if not state.current:
        raise CatalogError(f"capture on {state.entity} is not up to date with dx.yaml and the "
                           "database (see 'dx capture status'); run 'dx capture install' first")
    return load_spec(conn, state.entity, state.version), state.version


def _key_params(prefix: str, spec: TableSpec, key: Mapping[str, Any]) -> dict[str, str | None]:
    """A stored key as one text parameter per key column (``a0``, ``a1``, ...).

    Keys are stored as each column's text form; a snapshot interrupted before this format
    stored JSON scalars, which are turned back into the same text."""
    out: dict[str, str | None] = {}
    for i, name in enumerate(spec.key):
        value = key.get(name)
        out[f"{prefix}{i}"] = (value if isinstance(value, str) or value is None
                               else json.dumps(value))
    return out


def _key_row(spec: TableSpec) -> sql.Composable:
    return sql.SQL("ROW({})").format(sql.SQL(", ").join(
        sql.SQL("t.{}").format(sql.Identifier(k)) for k in spec.key))


def _param_row(prefix: str, spec: TableSpec) -> sql.Composable:
    # Python str is sent with no type (psycopg's default), so each parameter takes the type of
    # the key column it is compared with: no type is named, whatever schema it lives in.
    return sql.SQL("ROW({})").format(sql.SQL(", ").join(
        sql.Placeholder(f"{prefix}{i}") for i in range(len(spec.key))))


def _range(spec: TableSpec, *, after: bool, upto: bool) -> sql.Composable:
    conds: list[sql.Composable] = []
    if after:
        conds.append(sql.SQL("{} > {}").format(_key_row(spec), _param_row("a", spec)))
    if upto:
        conds.append(sql.SQL("{} <= {}").format(_key_row(spec), _param_row("b", spec)))
    if not conds:
        return sql.SQL("")
    return sql.SQL("WHERE ") + sql.SQL(" AND ").join(conds)


def _order(spec: TableSpec) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(k)) for k in spec.key)


def _key_text(spec: TableSpec) -> sql.Composable:
    """The key of ``t`` as a JSON object of each column's text form (in chunks of 50, the
    100-argument cap of jsonb_build_object)."""
    names = spec.key
    parts = [sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(
        sql.SQL("{}, t.{}::text").format(sql.Literal(n), sql.Identifier(n))
        for n in names[i:i + 50])) for i in range(0, len(names), 50)]
    return sql.SQL(" || ").join(parts)


def _bound_sql(spec: TableSpec, chunk: int, *, after: bool) -> sql.Composed:
    """The ``chunk``-th key after the last one (no locks), as each key column's text; no row
    when fewer are left."""
    return sql.SQL("SELECT {key} FROM {table} t {where} ORDER BY {order} "
                   "OFFSET {skip} LIMIT 1").format(
        key=_key_text(spec), table=sql.Identifier(spec.schema, spec.table),
        where=_range(spec, after=after, upto=False), order=_order(spec),
        skip=sql.Literal(chunk - 1))


def _copy_sql(spec: TableSpec, version: int, *, after: bool, upto: bool,
              stream: bool = False) -> sql.Composed:
    """Copy the rows with ``last < key [<= bound]`` into the outbox as op='r' (logical capture:
    one transactional message per row, in the change stream at the chunk's commit); returns
    the count.

    ``FOR SHARE`` re-checks the range on the newest version of a row a concurrent transaction
    changed, so a row whose key moved out of the range is left to its captured d/c events."""
    write = sql.SQL("""
    SELECT pg_logical_emit_message(true, {prefix}, jsonb_build_object(
        'e', {ent}, 'v', {ver}, 'k', key, 'a', after)::text) FROM chunk
""" if stream else """
    INSERT INTO dx.outbox (entity, version, op, key, after, origin)
    SELECT {ent}, {ver}, 'r', key, after, NULL FROM chunk
    RETURNING 1
""").format(ent=sql.Literal(spec.entity), ver=sql.Literal(version),
            prefix=sql.Literal(SNAPSHOT_PREFIX))
    return sql.SQL("""
WITH chunk AS (
    SELECT {key} AS key, {row} AS after FROM {table} t {where}
    ORDER BY {order} FOR SHARE
), ins AS ({write})
SELECT count(*) FROM ins
""").format(
        key=ddl._json_object(spec.key_columns, "t"), row=ddl._json_object(spec.columns, "t"),
        table=sql.Identifier(spec.schema, spec.table), where=_range(spec, after=after, upto=upto),
        order=_order(spec), write=write)
