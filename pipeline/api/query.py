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
by ``psycopg.sql.Identifier``. Filters combine with AND.
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


@dataclass
class ListQuery:
    offset: int = 0
    limit: int = 50
    where: list[sql.Composable] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)
    order: list[sql.Composable] = field(default_factory=list)
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
    q.order += [sql.SQL("{} ASC").format(sql.Identifier("t", f.col)) for f in entity.key_fields]
    return q


def _sort(entity: Entity, raw: str) -> list[sql.Composable]:
    out: list[sql.Composable] = []
    for part in raw.split(","):
        part = part.strip()
        desc = part.startswith("-")
        name = part.lstrip("+-")
        f = entity.fields.get(name)
        if f is None:
            raise fail("unknown_field", f"{entity.alias} has no field {name!r}", "sort")
        if not f.rule.sort or f.column.type in ("json", "jsonb"):
            raise fail("bad_query", f"{name} cannot be sorted on", "sort")
        out.append(sql.SQL("{} {}").format(sql.Identifier("t", f.col),
                                           sql.SQL("DESC" if desc else "ASC")))
    return out


def _coerce_query(f: Field, raw: str, path: str) -> Any:
    try:
        return f.coerce(raw)
    except ValueError as err:
        raise fail("bad_query", f"{f.name}: {err}", path) from None


def _condition(f: Field, ref: sql.Composable, op: str, raw: str, path: str,
               params: list[Any]) -> sql.Composable:
    if op == "null":
        flag = raw.strip().lower()
        if flag not in _TRUE | _FALSE:
            raise fail("bad_query", "[null] takes true or false", path)
        return sql.SQL("{} IS NULL" if flag in _TRUE else "{} IS NOT NULL").format(ref)
    if op == "in":
        values = [_coerce_query(f, v, path) for v in raw.split(",")] if raw else []
        if not values:
            raise fail("bad_query", "[in] needs at least one value", path)
        params.extend(values)
        return sql.SQL("{} IN ({})").format(ref, sql.SQL(", ").join(
            sql.Placeholder() for _ in values))
    params.append(_coerce_query(f, raw, path))
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
        q.where.append(_condition(f, sql.Identifier("t", f.col), op, raw, name, q.params))
        return
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
    join = sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier("c", child.fields[c].col),
                                  sql.Identifier("t", entity.fields[p].col))
        for p, c in zip(rel.parent_fields, rel.child_fields, strict=True))
    cond = _condition(cf, sql.Identifier("c", cf.col), op, raw, name, q.params)
    q.where.append(sql.SQL("EXISTS (SELECT 1 FROM {} AS c WHERE {} AND {})").format(
        child.ident, join, cond))


def _where(q: ListQuery) -> sql.Composable:
    if not q.where:
        return sql.SQL("")
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(q.where)


def to_row(entity: Entity, record: Sequence[Any]) -> Row:
    return {name: record[i] for i, name in enumerate(entity.fields)}


def list_rows(conn: psycopg.Connection[Any], entity: Entity, q: ListQuery) -> tuple[
        list[Row], int]:
    where = _where(q)
    total_row = conn.execute(sql.SQL("SELECT count(*) FROM {} AS t").format(entity.ident)
                             + where, q.params).fetchone()
    total = int(total_row[0]) if total_row else 0
    stmt = (sql.SQL("SELECT {} FROM {} AS t").format(entity.select_list("t"), entity.ident)
            + where + sql.SQL(" ORDER BY ") + sql.SQL(", ").join(q.order)
            + sql.SQL(" LIMIT %s OFFSET %s"))
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


def key_condition(entity: Entity, alias: str | None = None) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("{} = %s").format(sql.Identifier(alias, f.col) if alias else f.ident)
        for f in entity.key_fields)


def get_row(conn: psycopg.Connection[Any], entity: Entity, key: Sequence[Any], *,
            lock: bool = False) -> Row | None:
    stmt = sql.SQL("SELECT {} FROM {} WHERE {}").format(
        entity.select_list(), entity.ident, key_condition(entity))
    if lock:
        stmt += sql.SQL(" FOR UPDATE")
    r = conn.execute(stmt, list(key)).fetchone()
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
            cols = [sql.Identifier("c", child.fields[c].col) for c in rel.child_fields]
            ordered = sorted(keys, key=repr)
            tuples = sql.SQL(", ").join(
                sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() for _ in cols))
                for _ in ordered)
            stmt = sql.SQL("SELECT {} FROM {} AS c WHERE ({}) IN ({}) ORDER BY {}").format(
                child.select_list("c"), child.ident, sql.SQL(", ").join(cols), tuples,
                sql.SQL(", ").join(sql.Identifier("c", f.col) for f in child.key_fields))
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
