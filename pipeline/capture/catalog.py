"""Read captured tables from the live catalog and check them against dx.yaml.

Names from configuration are only ever used as bind parameters here; the resulting spec carries
the catalog's own spelling, which the DDL generator quotes with ``psycopg.sql.Identifier``.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pipeline.capture.spec import ColumnSpec, TableSpec
from pipeline.config import DxConfig, TableConfig
from pipeline.errors import CatalogError
from pipeline.events.avro import avro_name

_COLUMNS = """
SELECT a.attname, COALESCE(et.typname, t.typname), NOT a.attnotnull,
       et.oid IS NOT NULL, a.atttypmod, COALESCE(et.typcategory, t.typcategory)
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type et ON t.typcategory = 'A' AND et.oid = t.typelem
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_PKEY = """
SELECT a.attname FROM pg_index i
JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.ord
"""


def _typmod(typname: str, typmod: int) -> tuple[int | None, int | None]:
    if typmod < 0:
        return None, None
    if typname == "numeric":
        mod = typmod - 4
        return (mod >> 16) & 0xFFFF, mod & 0xFFFF
    if typname in ("varchar", "bpchar"):
        return typmod - 4, None
    return None, None


def table_oid(conn: psycopg.Connection[Any], schema: str, table: str) -> int | None:
    row = conn.execute(
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (schema, table),
    ).fetchone()
    return int(row[0]) if row else None


def read_table(conn: psycopg.Connection[Any], config: DxConfig, index: int) -> TableSpec:
    """The spec of ``config.tables[index]``; CatalogError names the dx.yaml line on mismatch."""
    t: TableConfig = config.tables[index]

    def fail(msg: str, *loc: str | int) -> CatalogError:
        file, line = config.where("tables", index, *loc)
        return CatalogError(f"{file}:{line}: {msg}" if line else f"{file}: {msg}")

    oid = table_oid(conn, t.schema_name, t.table_name)
    if oid is None:
        raise fail(f"table {t.qualified} does not exist in the database", "name")
    cols: dict[str, ColumnSpec] = {}
    for name, typ, nullable, is_array, typmod, category in conn.execute(_COLUMNS, (oid,)):
        precision, scale = _typmod(typ, typmod)
        cols[name] = ColumnSpec(name=name, type=typ, nullable=nullable, is_array=is_array,
                                precision=precision, scale=scale, category=category)
    for i, c in enumerate(t.columns):
        if c not in cols:
            raise fail(f"column {c!r} does not exist in {t.qualified} "
                       f"(columns: {', '.join(cols)})", "columns", i)
    pk = [r[0] for r in conn.execute(_PKEY, (oid,))]
    key = list(t.key) if t.key else pk
    if not key:
        raise fail(f"table {t.qualified} has no primary key; set 'key:' to columns that "
                   "identify a row", "name")
    for i, k in enumerate(key):
        if k not in cols:
            raise fail(f"key column {k!r} does not exist in {t.qualified}", "key", i)
        if k not in t.columns:
            raise fail(f"key column {k!r} must also be listed in 'columns' (it leaves the "
                       "database as the Kafka key)", "columns")
    seen: dict[str, str] = {}
    for i, c in enumerate(t.columns):
        other = seen.setdefault(avro_name(c), c)
        if other != c:
            raise fail(f"columns {other!r} and {c!r} both become Avro field {avro_name(c)!r}",
                       "columns", i)
    return TableSpec(
        entity=t.qualified,
        schema=t.schema_name,
        table=t.table_name,
        topic=config.topic_for(t),
        key=tuple(key),
        columns=tuple(cols[c] for c in t.columns),
    )


def read_all(conn: psycopg.Connection[Any], config: DxConfig) -> list[TableSpec]:
    return [read_table(conn, config, i) for i in range(len(config.tables))]
