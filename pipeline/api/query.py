"""Reads: list queries (pagination, filters, sorting, includes) and reads by id.

Query parameters of ``GET /{alias}``::

    offset=0 & limit=50                 pagination (limit capped by the entity's max_limit)
    sort=price,-name                    ascending / descending; the key breaks ties
    include=variants,images             child relations, embedded under their name
    price[gte]=10 & price[lt]=20        ranges: gt, gte, lt, lte
    status=active  (or status[eq]=)     equality; status[ne]=, status[in]=a,b,c, note[null]=true
    variants.sku=ABC                    a filter on a relation: parents having such a child

Every name is looked up among the exposed fields (an unexposed column cannot be reached), every
value is coerced by the field's coercer and sent as a bind parameter, every identifier is quoted
by ``psycopg.sql.Identifier``. Filters combine with AND. Parsing yields the query's *shape* (which
fields, operators and sort) and its values; the statement of a shape is composed once and kept
(``pipeline.api.statements``).
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from pipeline.api.catalog import Entity, Field, Relation
from pipeline.api.errors import ApiError, Problem, fail

OPS = ("eq", "ne", "in", "gt", "gte", "lt", "lte", "null")
RESERVED = ("offset", "limit", "sort", "include")
#: PostgreSQL's OFFSET is a bigint; a larger one is a bad query, not a database error.
MAX_OFFSET = 2**63 - 1
_PARAM = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?"
                    r"(?:\[([a-z]+)\])?$")
_CMP = {"eq": "=", "ne": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}

Row = dict[str, Any]
#: One filter's shape: (field or relation, the relation's field or None, operator, [in] count).
Cond = tuple[str, str | None, str, int]


@dataclass
class ListQuery:
    offset: int = 0
    limit: int = 50
    where: list[Cond] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)
    order: list[tuple[str, bool]] = field(default_factory=list)  # (field, descending)
    include: list[Relation] = field(default_factory=list)


def filterable(f: Field) -> bool:
    return f.rule.filter and not f.column.is_array and f.column.type not in (
        "json", "jsonb", "bytea")


def _int_param(name: str, raw: str, low: int, high: int | None) -> int:
    try:
        n = int(raw)
    except ValueError:
        raise fail("bad_query", f"{name} must be an integer", name) from None
    if n < low or (high is not None and n > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise fail("bad_query", f"{name} must be {bound}", name)
    return n


def parse_include(entity: Entity, raw: str | None,
                  can_read: Callable[[str], bool]) -> list[Relation]:
    out: list[Relation] = []
    for name in (raw or "").split(","):
        name = name.strip()
        if not name:
            continue
        rel = entity.relations.get(name)
        if rel is None:
            known = ", ".join(entity.relations) or "none"
            raise fail("unknown_field", f"{entity.alias} has no relation {name!r} "
                                        f"(relations: {known})", "include")
        if not can_read(rel.child):
            raise fail("forbidden", f"this key may not read {rel.child}", "include")
        if rel not in out:
            out.append(rel)
    return out


def parse_list(entity: Entity, entities: Mapping[str, Entity],
               params: Sequence[tuple[str, str]], default_limit: int,
               can_read: Callable[[str], bool]) -> ListQuery:
    """Query parameters -> a checked :class:`ListQuery`; ApiError lists every problem."""
    q = ListQuery(limit=min(default_limit, entity.max_limit))
    problems: list[Problem] = []
    seen: set[str] = set()
    for name, raw in params:
        try:
            if name in RESERVED:
                if name in seen:
                    raise fail("bad_query", f"{name} is given twice", name)
                seen.add(name)
                if name == "offset":
                    q.offset = _int_param(name, raw, 0, MAX_OFFSET)
                elif name == "limit":
                    q.limit = _int_param(name, raw, 1, entity.max_limit)
                elif name == "sort":
                    q.order = _sort(entity, raw)
                else:
                    q.include = parse_include(entity, raw, can_read)
                continue
            _filter(entity, entities, q, name, raw, can_read)
        except ApiError as err:
            problems.extend(err.problems)
    if problems:
        raise ApiError(problems)
    return q


def _sort(entity: Entity, raw: str) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for part in raw.split(","):
        part = part.strip()
        desc = part.startswith("-")
        name = part.lstrip("+-")
        f = entity.fields.get(name)
        if f is None:
            raise fail("unknown_field", f"{entity.alias} has no field {name!r}", "sort")
        if not f.rule.sort or f.column.type in ("json", "jsonb"):
            raise fail("bad_query", f"{name} cannot be sorted on", "sort")
        out.append((name, desc))
    return out


def _coerce_query(f: Field, raw: str, path: str) -> Any:
    try:
        return f.coerce(raw)
    except ValueError as err:
        raise fail("bad_query", f"{f.name}: {err}", path) from None


def _values(f: Field, op: str, raw: str, path: str, params: list[Any]) -> int:
    """Check and bind the value(s) of one filter; the number of [in] values (else 0)."""
    if op == "null":
        if raw.strip().lower() not in _TRUE | _FALSE:
            raise fail("bad_query", "[null] takes true or false", path)
        return 0
    if op == "in":
        values = [_coerce_query(f, v, path) for v in raw.split(",")] if raw else []
        if not values:
            raise fail("bad_query", "[in] needs at least one value", path)
        params.extend(values)
        return len(values)
    params.append(_coerce_query(f, raw, path))
    return 0


def _condition(ref: sql.Composable, op: str, count: int) -> sql.Composable:
    if op == "null":  # [null]=true and [null]=false differ in shape: see _filter
        return sql.SQL("{} IS NULL").format(ref)
    if op == "notnull":
        return sql.SQL("{} IS NOT NULL").format(ref)
    if op == "in":
        return sql.SQL("{} IN ({})").format(ref, sql.SQL(", ").join(
            sql.Placeholder() for _ in range(count)))
    return sql.SQL("{} {} %s").format(ref, sql.SQL(_CMP[op]))


def _filter(entity: Entity, entities: Mapping[str, Entity], q: ListQuery, name: str,
            raw: str, can_read: Callable[[str], bool]) -> None:
    m = _PARAM.match(name)
    if m is None:
        raise fail("unknown_field", f"unknown query parameter {name!r}", name)
    first, second, op = m.group(1), m.group(2), m.group(3) or "eq"
    if op not in OPS:
        raise fail("bad_query", f"unknown operator [{op}] (use {', '.join(OPS)})", name)
    if second is None:
        f = entity.fields.get(first)
        if f is None:
            raise fail("unknown_field", f"{entity.alias} has no field {first!r}", name)
        if not filterable(f):
            raise fail("bad_query", f"{first} cannot be filtered on", name)
    else:
        rel = entity.relations.get(first)
        if rel is None:
            raise fail("unknown_field", f"{entity.alias} has no relation {first!r}", name)
        if not can_read(rel.child):
            raise fail("forbidden", f"this key may not read {rel.child}", name)
        child = entities[rel.child]
        cf = child.fields.get(second)
        if cf is None:
            raise fail("unknown_field", f"{child.alias} has no field {second!r}", name)
        if not filterable(cf):
            raise fail("bad_query", f"{rel.child}.{second} cannot be filtered on", name)
        f = cf
    count = _values(f, op, raw, name, q.params)
    if op == "null" and raw.strip().lower() in _FALSE:
        op = "notnull"
    q.where.append((first, second, op, count))


def _where_sql(entity: Entity, entities: Mapping[str, Entity],
               where: Sequence[Cond]) -> sql.Composable:
    if not where:
        return sql.SQL("")
    parts: list[sql.Composable] = []
    for first, second, op, count in where:
        if second is None:
            parts.append(_condition(sql.Identifier("t", entity.fields[first].col), op, count))
            continue
        rel = entity.relations[first]
        child = entities[rel.child]
        join = sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(sql.Identifier("c", child.fields[c].col),
                                      sql.Identifier("t", entity.fields[p].col))
            for p, c in zip(rel.parent_fields, rel.child_fields, strict=True))
        cond = _condition(sql.Identifier("c", child.fields[second].col), op, count)
        parts.append(sql.SQL("EXISTS (SELECT 1 FROM {} AS c WHERE {} AND {})").format(
            child.ident, join, cond))
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(parts)


def to_row(entity: Entity, record: Sequence[Any]) -> Row:
    return {name: record[i] for i, name in enumerate(entity.fields)}


def list_rows(conn: psycopg.Connection[Any], entity: Entity, entities: Mapping[str, Entity],
              q: ListQuery) -> tuple[list[Row], int]:
    where = tuple(q.where)
    count = entity.statements.shaped(("count", where), lambda: sql.SQL(
        "SELECT count(*) FROM {} AS t").format(entity.ident)
        + _where_sql(entity, entities, where))
    total_row = conn.execute(count, q.params).fetchone()
    total = int(total_row[0]) if total_row else 0
    order = tuple(q.order)

    def select() -> sql.Composable:
        keys = [(f.name, False) for f in entity.key_fields]
        return (sql.SQL("SELECT {} FROM {} AS t").format(entity.select_list("t"), entity.ident)
                + _where_sql(entity, entities, where) + sql.SQL(" ORDER BY ")
                + sql.SQL(", ").join(
                    sql.SQL("{} {}").format(sql.Identifier("t", entity.fields[n].col),
                                            sql.SQL("DESC" if desc else "ASC"))
                    for n, desc in [*order, *keys])
                + sql.SQL(" LIMIT %s OFFSET %s"))

    stmt = entity.statements.shaped(("select", where, order), select)
    rows = [to_row(entity, r) for r in conn.execute(stmt, [*q.params, q.limit, q.offset])]
    return rows, total


def parse_id(entity: Entity, raw: str) -> tuple[Any, ...]:
    """The key of ``/{alias}/{id}`` (composite keys: values joined by ',')."""
    parts = raw.split(",") if len(entity.key) > 1 else [raw]
    if len(parts) != len(entity.key):
        raise fail("not_found", f"no {entity.alias} with id {raw!r} (the key has "
                                f"{len(entity.key)} parts: {', '.join(entity.key)})", "id")
    out = []
    for f, part in zip(entity.key_fields, parts, strict=True):
        try:
            out.append(f.coerce(part))
        except ValueError:
            raise fail("not_found", f"no {entity.alias} with id {raw!r}", "id") from None
    return tuple(out)


def get_row(conn: psycopg.Connection[Any], entity: Entity, key: Sequence[Any], *,
            lock: bool = False) -> Row | None:
    stmt = entity.statements.get_locked if lock else entity.statements.get
    r = conn.execute(stmt, key).fetchone()
    return to_row(entity, r) if r is not None else None


def attach_children(conn: psycopg.Connection[Any], entities: Mapping[str, Entity],
                    entity: Entity, rows: list[Row], include: list[Relation]) -> None:
    """Embed each included relation's child rows under the relation's name (one query each)."""
    for rel in include:
        child = entities[rel.child]
        groups: dict[tuple[Any, ...], list[Row]] = {}
        keys = {tuple(r[p] for p in rel.parent_fields) for r in rows}
        keys.discard(tuple(None for _ in rel.parent_fields))
        if keys:
            ordered = sorted(keys, key=repr)

            def children(rel: Relation = rel, child: Entity = child,
                         n: int = len(ordered)) -> sql.Composable:
                cols = [sql.Identifier("c", child.fields[c].col) for c in rel.child_fields]
                tuples = sql.SQL(", ").join(
                    sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() for _ in cols))
                    for _ in range(n))
                return sql.SQL("SELECT {} FROM {} AS c WHERE ({}) IN ({}) ORDER BY {}").format(
                    child.select_list("c"), child.ident, sql.SQL(", ").join(cols), tuples,
                    sql.SQL(", ").join(sql.Identifier("c", f.col) for f in child.key_fields))

            stmt = entity.statements.shaped(("children", rel.name, len(ordered)), children)
            flat = [v for k in ordered for v in k]
            for r in conn.execute(stmt, flat):
                crow = to_row(child, r)
                groups.setdefault(tuple(crow[c] for c in rel.child_fields), []).append(crow)
        for r in rows:
            r[rel.name] = groups.get(tuple(r[p] for p in rel.parent_fields), [])


def render(v: Any) -> Any:
    """A database value as JSON (numeric as a JSON number; times as ISO 8601)."""
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if v == v and v not in (float("inf"), float("-inf")) else None
    if isinstance(v, Decimal):
        if not v.is_finite():
            return None
        exp = v.as_tuple().exponent
        return int(v) if isinstance(exp, int) and exp >= 0 else float(v)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(v)).decode("ascii")
    if isinstance(v, list | tuple):
        return [render(x) for x in v]
    if isinstance(v, dict):
        return {str(k): render(x) for k, x in v.items()}
    return str(v)


def render_row(row: Row) -> dict[str, Any]:
    return {k: render(v) for k, v in row.items()}
