"""Read captured tables from the live catalog and check them against dx.yaml.

Names from configuration are only ever used as bind parameters here; the resulting spec carries
the catalog's own spelling, which the DDL generator quotes with ``psycopg.sql.Identifier``.
:func:`read_columns` is dx's one reader of a table's columns (capture specs, inbound targets,
API entities, CSV export).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from pipeline.capture.spec import ColumnSpec, TableSpec, avro_name
from pipeline.config import DxConfig, TableConfig
from pipeline.errors import CatalogError

# A domain column is described by its base type (and the domain's type modifier), as Debezium
# does: consumers get the base type's Avro form, a replica's domain column accepts it, and an
# inbound value is checked as the base type (PostgreSQL checks the domain's constraints).
_COLUMNS = """
SELECT a.attname, COALESCE(et.typname, bt.typname, t.typname), NOT a.attnotnull,
       et.oid IS NOT NULL, CASE WHEN bt.oid IS NULL THEN a.atttypmod ELSE t.typtypmod END,
       COALESCE(et.typcategory, bt.typcategory, t.typcategory),
       a.atthasdef OR a.attidentity <> '',
       a.attgenerated <> '' OR a.attidentity = 'a',
       COALESCE(et.oid, bt.oid, t.oid)
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
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

# Where the table sits in a partition or inheritance tree.
_TREE = """
SELECT c.relkind, c.relispartition,
       EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid),
       ARRAY(SELECT n.nspname || '.' || k.relname FROM pg_inherits i
             JOIN pg_class k ON k.oid = i.inhrelid JOIN pg_namespace n ON n.oid = k.relnamespace
             WHERE i.inhparent = c.oid AND NOT k.relispartition ORDER BY 1)
FROM pg_class c WHERE c.oid = %s
"""

# Every partition below a partitioned table, sub-partitioned ones included.
_PARTITIONS = """
SELECT n.nspname, c.relname, c.relkind FROM pg_partition_tree(%s::oid::regclass) t
JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.relid <> %s::oid::regclass ORDER BY t.level, n.nspname, c.relname
"""

# Unique indexes (constraints or not) over plain columns, with the constraint's name and timing.
_UNIQUE = """
SELECT COALESCE(con.conname, ic.relname), i.indimmediate, COALESCE(con.condeferred, false),
       ARRAY(SELECT a.attname FROM unnest(i.indkey[0:i.indnkeyatts - 1]) AS k(attnum)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum)
FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
     AND con.contype IN ('p', 'u')
WHERE i.indrelid = %s AND i.indisunique AND i.indpred IS NULL
      AND NOT (0 = ANY (i.indkey[0:i.indnkeyatts - 1]))
"""


@dataclass(frozen=True)
class CatalogColumn:
    """One column as the catalog describes it."""

    name: str
    type: str  # pg_type.typname: the element type of an array, the base type of a domain
    nullable: bool
    is_array: bool
    precision: int | None  # numeric(p, s), varchar(n) length in precision
    scale: int | None
    category: str  # pg_type.typcategory: 'E' enum, 'S' string, 'N' numeric, ...
    has_default: bool  # a default or an identity: the column may be left out of an INSERT
    generated: bool  # GENERATED ALWAYS (identity or stored expression): never written
    type_oid: int  # of ``type`` (an enum's labels are looked up by it)

    def spec(self) -> ColumnSpec:
        return ColumnSpec(name=self.name, type=self.type, nullable=self.nullable,
                          is_array=self.is_array, precision=self.precision, scale=self.scale,
                          category=self.category)


def read_columns(conn: psycopg.Connection[Any], oid: int) -> list[CatalogColumn]:
    """Every live column of the table ``oid``, in table order."""
    out = []
    for (name, typ, nullable, is_array, typmod, category, has_default, generated,
         type_oid) in conn.execute(_COLUMNS, (oid,)):
        precision, scale = typmod_parts(typ, typmod)
        out.append(CatalogColumn(name, typ, nullable, is_array, precision, scale, category,
                                 has_default, generated, type_oid))
    return out


def primary_key(conn: psycopg.Connection[Any], oid: int) -> list[str]:
    """The primary key's columns in key order (empty without a primary key)."""
    return [r[0] for r in conn.execute(_PKEY, (oid,))]


def typmod_parts(typname: str, typmod: int) -> tuple[int | None, int | None]:
    """(precision, scale) of numeric(p, s), (length, None) of varchar(n)/char(n)."""
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


def _error(config: DxConfig, index: int, msg: str, *loc: str | int) -> CatalogError:
    """CatalogError naming the dx.yaml line of ``tables[index]`` (at ``loc`` when it is there)."""
    file, line = config.where("tables", index, *loc)
    return CatalogError(f"{file}:{line}: {msg}" if line else f"{file}: {msg}")


def capture_mode(config: DxConfig, index: int) -> str:
    """``row`` or ``statement``: the table's ``capture:``, else the ``capture.trigger``
    default (the trigger kind; logical mode has no triggers but the TRUNCATE guard)."""
    return config.tables[index].capture or config.capture.trigger


def partitions(conn: psycopg.Connection[Any], schema: str,
               table: str) -> tuple[tuple[str, str], ...]:
    """(schema, name) of every partition below the table, sub-partitioned ones included (none
    for a plain table). PostgreSQL clones row triggers to partitions, but not TRUNCATE
    triggers: each of them gets its own TRUNCATE guard."""
    oid = table_oid(conn, schema, table)
    if oid is None:
        return ()
    return tuple((r[0], r[1]) for r in conn.execute(_PARTITIONS, (oid, oid)))


def read_table(conn: psycopg.Connection[Any], config: DxConfig, index: int, *,
               check_capture: bool = True) -> TableSpec:
    """The spec of ``config.tables[index]``; CatalogError names the dx.yaml line on mismatch.

    With ``check_capture`` the table must also be capturable in its configured mode (see
    :func:`_check_capture`); uninstall and status read tables without that check."""
    t: TableConfig = config.tables[index]

    def fail(msg: str, *loc: str | int) -> CatalogError:
        return _error(config, index, msg, *loc)

    oid = table_oid(conn, t.schema_name, t.table_name)
    if oid is None:
        raise fail(f"table {t.qualified} does not exist in the database", "name")
    cols = {c.name: c.spec() for c in read_columns(conn, oid)}
    for i, c in enumerate(t.columns):
        if c not in cols:
            raise fail(f"column {c!r} does not exist in {t.qualified} "
                       f"(columns: {', '.join(cols)})", "columns", i)
    pk = primary_key(conn, oid)
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
    if check_capture:
        _check_capture(conn, config, index, oid, key)
    return TableSpec(
        entity=t.qualified,
        schema=t.schema_name,
        table=t.table_name,
        topic=config.topic_for(t),
        key=tuple(key),
        columns=tuple(cols[c] for c in t.columns),
    )


def _check_capture(conn: psycopg.Connection[Any], config: DxConfig, index: int, oid: int,
                   key: list[str]) -> None:
    """Refuse layouts whose changes the configured capture mode would silently miss or misorder.

    * Statement triggers with transition tables fire only for the table a statement names: on
      a partitioned table (or inheritance parent) they miss every statement that names a
      partition, and on a partition every statement that goes through its parent. Row
      triggers are cloned to partitions, and fire for a partition's rows whichever table the
      statement names.
    * Row triggers on an inheritance parent do not fire for its children's rows at all.
    * Row triggers see each row as it is updated; with a DEFERRABLE key one UPDATE can move a
      key onto a row that is updated only later, and the events leave that key deleted.
    * An INITIALLY DEFERRED key may repeat between statements, which statement capture then
      gets wrong in the same way.
    """
    t = config.tables[index]
    mode = capture_mode(config, index)

    def fail(msg: str, *loc: str | int) -> CatalogError:
        return _error(config, index, msg, *loc)

    tree = conn.execute(_TREE, (oid,)).fetchone()
    assert tree is not None
    relkind, is_partition, is_child, inh_children = tree
    if inh_children:
        raise fail(f"table {t.qualified} has inheritance children ({', '.join(inh_children)}) "
                   "whose rows dx would not capture; list the child tables in dx.yaml instead",
                   "name")
    if mode == "statement" and (relkind == "p" or is_child):
        what = ("is partitioned: statements that name a partition" if relkind == "p" else
                "is a partition: statements that name its parent table" if is_partition else
                "inherits from another table: statements that name its parent table")
        raise fail(f"capture: statement cannot capture {t.qualified}, which {what} do not fire "
                   "its statement triggers and their changes would be lost; use 'capture: row'",
                   "capture")
    if relkind == "p":
        foreign = [f"{s}.{n}" for s, n, kind in conn.execute(_PARTITIONS, (oid, oid))
                   if kind == "f"]
        if foreign:
            raise fail(f"table {t.qualified} has foreign-table partitions ({', '.join(foreign)}) "
                       "whose changes on the remote server dx cannot capture", "name")
    if is_partition:
        ancestors = {int(r[0]) for r in conn.execute(
            "SELECT relid::oid FROM pg_partition_ancestors(%s::oid::regclass) WHERE relid <> %s",
            (oid, oid))}
        for j, other in enumerate(config.tables):
            if j != index and table_oid(conn, other.schema_name, other.table_name) in ancestors:
                file, line = config.where("tables", j, "name")
                raise fail(f"table {t.qualified} is a partition of {other.qualified}, which "
                           f"dx.yaml also captures (at {file}:{line}); capture only one of them",
                           "name")
    covering = [(name, immediate, deferred) for name, immediate, deferred, cols
                in conn.execute(_UNIQUE, (oid,)) if cols and set(cols) <= set(key)]
    if covering and not any(immediate for _, immediate, _ in covering):
        name, _, deferred = max(covering, key=lambda c: c[2])  # INITIALLY DEFERRED first
        keys = ", ".join(key)
        if deferred:
            raise fail(f"capture: {mode} cannot keep key order on {t.qualified}: its key ({keys}) "
                       f"is enforced by constraint {name}, DEFERRABLE INITIALLY DEFERRED, so a "
                       "key may repeat until commit and the events could leave it deleted; "
                       "declare the constraint NOT DEFERRABLE (or DEFERRABLE INITIALLY "
                       "IMMEDIATE with 'capture: statement')", "capture")
        if mode == "row":
            raise fail(f"capture: row cannot keep key order on {t.qualified}: its key ({keys}) "
                       f"is enforced by DEFERRABLE constraint {name}, so one UPDATE can move a "
                       "key onto a row that is updated later and the row events would leave "
                       "that key deleted; use 'capture: statement' (or declare the constraint "
                       "NOT DEFERRABLE)", "capture")


def read_all(conn: psycopg.Connection[Any], config: DxConfig) -> list[TableSpec]:
    return [read_table(conn, config, i) for i in range(len(config.tables))]
