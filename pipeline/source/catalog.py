"""The target table of an inbound route, read from the live catalog and checked against the route.

A route is checked once when a worker (or importer) starts: the table exists, every configured
column exists and is writable, the key has a unique index (``ON CONFLICT`` needs one). Config
names only ever travel as bind parameters here; the :class:`Target` keeps the catalog's spelling,
which the apply SQL quotes with ``psycopg.sql.Identifier``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from pipeline.capture.catalog import read_columns as read_catalog_columns
from pipeline.capture.catalog import table_oid
from pipeline.config.model import DxConfig
from pipeline.errors import CatalogError

_UNIQUE = """
SELECT i.indisprimary, array_agg(a.attname ORDER BY k.ord)
FROM pg_index i
JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %s AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
GROUP BY i.indexrelid, i.indisprimary
"""

_ENUM = "SELECT enumlabel FROM pg_enum WHERE enumtypid = %s ORDER BY enumsortorder"


@dataclass(frozen=True)
class Column:
    """One target column as PostgreSQL sees it."""

    name: str
    type: str  # pg_type.typname (element type for arrays)
    not_null: bool
    is_array: bool = False
    precision: int | None = None  # numeric precision, or varchar/bpchar length
    scale: int | None = None
    category: str = "U"
    has_default: bool = False
    generated: bool = False  # GENERATED ALWAYS (identity or stored expression): never written
    enum_labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Target:
    """The checked target of one route: table, writable columns, key, version column."""

    schema: str
    table: str
    key: tuple[str, ...]
    columns: dict[str, Column] = field(default_factory=dict)  # writable, in table order
    version: str | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"


def read_columns(conn: psycopg.Connection[Any], schema: str, table: str
                 ) -> tuple[dict[str, Column], list[tuple[bool, list[str]]]] | None:
    """Every column of a table (or partitioned table) with what validation needs, and its
    unique indexes as (is primary key, columns); None when there is no such table."""
    oid = table_oid(conn, schema, table)
    if oid is None:
        return None
    columns: dict[str, Column] = {}
    for c in read_catalog_columns(conn, oid):
        labels: tuple[str, ...] = ()
        if c.category == "E":
            labels = tuple(r[0] for r in conn.execute(_ENUM, (c.type_oid,)))
        columns[c.name] = Column(name=c.name, type=c.type, not_null=not c.nullable,
                                 is_array=c.is_array, precision=c.precision, scale=c.scale,
                                 category=c.category, has_default=c.has_default,
                                 generated=c.generated, enum_labels=labels)
    uniques = [(bool(p), list(cols)) for p, cols in conn.execute(_UNIQUE, (oid,)).fetchall()]
    return columns, uniques


def read_target(conn: psycopg.Connection[Any], config: DxConfig, index: int) -> Target:
    """Check ``config.sources[index]`` against the catalog; CatalogError names the dx.yaml line."""
    route = config.sources[index]

    def fail(msg: str, *loc: str | int) -> CatalogError:
        file, line = config.where("sources", index, *loc)
        return CatalogError(f"{file}:{line}: {msg}" if line else f"{file}: {msg}")

    found = read_columns(conn, route.schema_name, route.table_name)
    if found is None:
        raise fail(f"table {route.qualified} does not exist in the database", "table")
    every, uniques = found
    wanted = route.columns or [c for c, col in every.items() if not col.generated]
    writable: dict[str, Column] = {}
    for i, c in enumerate(wanted):
        if c not in every:
            raise fail(f"column {c!r} does not exist in {route.qualified} "
                       f"(columns: {', '.join(every)})", "columns", i)
        if every[c].generated:
            raise fail(f"column {c!r} of {route.qualified} is generated and cannot be written",
                       "columns", i)
        writable[c] = every[c]
    for src, dst in route.fields.items():
        if dst not in every:
            raise fail(f"field {src!r} maps to column {dst!r}, which does not exist in "
                       f"{route.qualified}", "fields", src)
        if dst not in writable:
            raise fail(f"field {src!r} maps to column {dst!r}, which is not writable",
                       "fields", src)
    if route.key:
        key = tuple(route.key)
        for i, k in enumerate(key):
            if k not in writable:
                raise fail(f"key column {k!r} is not a writable column of {route.qualified}",
                           "key", i)
        if not any(set(cols) == set(key) for _, cols in uniques):
            raise fail(f"key ({', '.join(key)}) of {route.qualified} needs a unique index or "
                       "primary key on exactly these columns (ON CONFLICT uses it)", "key")
    else:
        pk = next((tuple(cols) for primary, cols in uniques if primary), None)
        if pk is None:
            raise fail(f"table {route.qualified} has no primary key; set 'key:' to columns "
                       "with a unique index", "table")
        for k in pk:
            if k not in writable:
                raise fail(f"primary key column {k!r} must be writable (add it to 'columns')",
                           "columns")
        key = pk
    version = None
    if route.conflict is not None:
        version = route.conflict.column
        if version not in writable:
            raise fail(f"conflict column {version!r} is not a writable column of "
                       f"{route.qualified}", "conflict", "column")
        if version in key:
            raise fail("conflict column cannot be part of the key", "conflict", "column")
    return Target(schema=route.schema_name, table=route.table_name, key=key, columns=writable,
                  version=version)
