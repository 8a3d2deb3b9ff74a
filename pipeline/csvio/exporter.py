"""``dx export TABLE``: a consistent CSV snapshot of a table's exposed columns.

Only the columns listed for the table in dx.yaml leave the database (the same allow-list the
topics use). The export runs in one ``REPEATABLE READ READ ONLY`` transaction, so every row comes
from the same snapshot even while the shop keeps writing, and streams with ``COPY ... TO STDOUT``
(no row is held in memory). Rows are ordered by key so two exports of the same state are
byte-identical. The output file is written beside its destination and renamed into place when
complete, so a failed export never leaves a truncated file behind.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import sql

from pipeline import db
from pipeline.capture.catalog import primary_key, read_columns, table_oid
from pipeline.config.model import DxConfig, TableConfig
from pipeline.errors import CatalogError, ConfigError

Progress = Callable[[int, int], None]  # (rows done, rows estimated)


def _table(config: DxConfig, name: str) -> TableConfig:
    try:
        return config.table(name)
    except KeyError as err:
        raise ConfigError(f"{err.args[0]}; only configured tables can be exported",
                          file=config.where()[0]) from None


def _check(conn: psycopg.Connection[Any], t: TableConfig) -> tuple[list[str], int]:
    """Catalog spelling of the exposed columns and key, and the planner's row estimate."""
    oid = table_oid(conn, t.schema_name, t.table_name)
    if oid is None:
        raise CatalogError(f"table {t.qualified} does not exist in the database")
    row = conn.execute("SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = %s",
                       (oid,)).fetchone()
    estimate = int(row[0]) if row else 0
    cols = {c.name for c in read_columns(conn, oid)}
    for c in t.columns:
        if c not in cols:
            raise CatalogError(f"column {c!r} of {t.qualified} (dx.yaml) does not exist")
    key = list(t.key) if t.key else primary_key(conn, oid)
    return key, estimate


def export_csv(config: DxConfig, table: str, out: Path | None, *,
               progress: Progress | None = None) -> int:
    """Write the snapshot to ``out`` (stdout when None); returns the number of rows."""
    t = _table(config, table)
    url = config.database.url.get_secret_value()
    with db.connection(url, connect_timeout_s=config.database.connect_timeout_s,
                       application_name="dx-export") as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        key, estimate = _check(conn, t)
        cols = sql.SQL(", ").join(map(sql.Identifier, t.columns))
        order = sql.SQL(" ORDER BY {}").format(
            sql.SQL(", ").join(map(sql.Identifier, key))) if key else sql.SQL("")
        query = sql.SQL("COPY (SELECT {cols} FROM {t}{order}) TO STDOUT "
                        "WITH (FORMAT csv, HEADER true)").format(
            cols=cols, t=sql.Identifier(t.schema_name, t.table_name), order=order)
        if out is None:
            return _stream(conn, query, sys.stdout.buffer, estimate, progress)
        tmp = out.with_name(f".{out.name}.dx-partial")
        try:
            with tmp.open("wb") as f:
                rows = _stream(conn, query, f, estimate, progress)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(out)
        finally:
            if tmp.exists():
                tmp.unlink()
        return rows


def _stream(conn: psycopg.Connection[Any], query: sql.Composed, f: IO[bytes], estimate: int,
            progress: Progress | None) -> int:
    """Copy rows out chunk by chunk. Rows are counted by record ends outside quotes, so a
    newline inside a quoted value is not a row."""
    lines = 0
    in_quotes = False
    with conn.cursor() as cur, cur.copy(query) as copy:
        for chunk in copy:
            data = bytes(chunk)
            f.write(data)
            if b'"' in data:
                for part_i, part in enumerate(data.split(b'"')):
                    if part_i:
                        in_quotes = not in_quotes
                    if not in_quotes:
                        lines += part.count(b"\n")
            else:
                lines += 0 if in_quotes else data.count(b"\n")
            if progress is not None:
                progress(max(0, lines - 1), max(estimate, lines - 1))
    conn.rollback()
    rows = max(0, lines - 1)
    if progress is not None:
        progress(rows, rows)
    return rows
