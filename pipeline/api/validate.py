"""Request bodies -> column values, with every problem reported at its JSON path.

Values go through the same coercers as inbound events (``pipeline.source.validate``: integer
ranges, numeric precision and scale, varchar lengths, enum labels, UUIDs, ISO dates...), after a
strict JSON-type check (an API client sends ``12``, not ``"12"``, where the OpenAPI document says
integer), and then through the field's own rules from dx.yaml. All problems of a request are
collected, not just the first, so a batch of 1,000 rows with 3 bad ones gets 3 precise errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Literal

from pipeline.api.catalog import Entity, Field
from pipeline.api.errors import Problem, join_path
from pipeline.source.catalog import Column

Mode = Literal["create", "replace", "update"]

_INTS = {"int2", "int4", "int8", "oid"}
_FLOATS = {"numeric", "float4", "float8"}
_TEXT = {"text", "varchar", "bpchar", "name", "citext"}
_ANY = {"json", "jsonb"}


def json_kind(col: Column, *, element: bool = False) -> str:
    """The JSON type a column's values take: integer, number, boolean, string, array, any."""
    if col.is_array and not element:
        return "array"
    if col.category == "E":
        return "string"
    if col.type in _INTS:
        return "integer"
    if col.type in _FLOATS:
        return "number"
    if col.type == "bool":
        return "boolean"
    if col.type in _ANY:
        return "any"
    return "string"


def _kind_ok(kind: str, v: Any) -> bool:
    if kind == "any":
        return True
    if kind == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "number":
        return isinstance(v, int | float | Decimal) and not isinstance(v, bool) and (
            not isinstance(v, float) or math.isfinite(v))
    if kind == "boolean":
        return isinstance(v, bool)
    if kind == "array":
        return isinstance(v, list)
    return isinstance(v, str)


def _text_limit(f: Field) -> int | None:
    limits = [n for n in (f.rule.max_length, f.column.precision if f.column.type in (
        "varchar", "bpchar") else None) if n is not None]
    return min(limits) if limits else None


def check_value(f: Field, v: Any, path: str) -> tuple[Any, Problem | None]:
    """The column value of ``v`` for field ``f``, or the problem with it."""
    col = f.column
    if v is None:
        if col.not_null:
            return None, Problem("null_not_allowed", f"{f.name} cannot be null", path)
        return None, None
    kind = json_kind(col)
    if not _kind_ok(kind, v):
        return None, Problem("wrong_type", f"expected {kind}, got {_json_name(v)}", path)
    if kind == "array":
        ek = json_kind(col, element=True)
        for i, x in enumerate(v):
            if x is not None and not _kind_ok(ek, x):
                return None, Problem("wrong_type", f"expected {ek}, got {_json_name(x)}",
                                     join_path(path, i))
    if isinstance(v, str):
        limit = _text_limit(f)
        if limit is not None and len(v) > limit:
            return None, Problem("max_length", f"is {len(v)} characters long; at most {limit} "
                                               "allowed", path)
        if f.rule.min_length is not None and len(v) < f.rule.min_length:
            return None, Problem("min_length", f"is {len(v)} characters long; at least "
                                               f"{f.rule.min_length} required", path)
        if f.pattern is not None and not f.pattern.search(v):
            return None, Problem("pattern", f"does not match {f.pattern.pattern}", path)
    try:
        value = f.coerce(v)
    except ValueError as err:
        return None, Problem("wrong_type", str(err), path)
    if f.rule.min_value is not None and value < f.rule.min_value:
        return None, Problem("min_value", f"{v} is less than {_num(f.rule.min_value)}", path)
    if f.rule.max_value is not None and value > f.rule.max_value:
        return None, Problem("max_value", f"{v} is greater than {_num(f.rule.max_value)}", path)
    if f.enum is not None and value not in f.enum:
        allowed = ", ".join(str(x) for x in f.enum)
        return None, Problem("enum", f"{v!r} is not one of {allowed}", path)
    return value, None


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def _json_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float | Decimal):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def validate_item(entity: Entity, item: Any, mode: Mode, path: str,
                  url_key: Mapping[str, Any] | None = None) -> tuple[dict[str, Any],
                                                                    list[Problem]]:
    """Field values (public name -> coerced value) of one body item, and its problems.

    ``create`` refuses non-creatable fields and requires the required ones; ``replace`` (PUT)
    requires the required editable ones and leaves (non-)editability to the store, which knows
    whether the row exists; ``update`` (PATCH) takes any subset. Key fields given in the body must
    equal ``url_key`` when the URL names the row.
    """
    problems: list[Problem] = []
    if not isinstance(item, dict):
        return {}, [Problem("bad_body", f"expected an object, got {_json_name(item)}",
                            path or None)]
    values: dict[str, Any] = {}
    for name, v in item.items():
        p = join_path(path, name)
        f = entity.fields.get(name)
        if f is None:
            problems.append(Problem("unknown_field", f"{entity.alias} has no field {name!r}", p))
            continue
        if mode == "create" and not f.rule.creatable:
            problems.append(Problem("not_creatable", f"{name} is set by the server", p))
            continue
        value, problem = check_value(f, v, p)
        if problem is not None:
            problems.append(problem)
            continue
        if url_key is not None and name in url_key and value != url_key[name]:
            problems.append(Problem("key_mismatch", f"{name} differs from the id in the URL", p))
            continue
        values[name] = value
    if mode in ("create", "replace"):
        for f in entity.fields.values():
            # replace: a non-editable field is only needed when PUT creates (the store checks)
            if mode == "replace" and not f.rule.editable:
                continue
            if f.required and f.name not in item and (url_key is None or f.name not in url_key):
                problems.append(Problem("required", f"{f.name} is required",
                                        join_path(path, f.name)))
    return values, problems


def batch_items(body: Any) -> tuple[list[Any], bool, list[Problem]]:
    """(items, is_batch, problems) of a write body: one object, or ``{"data": [objects]}``."""
    if isinstance(body, dict) and set(body) == {"data"}:
        data = body["data"]
        if not isinstance(data, list):
            return [], True, [Problem("bad_body", "'data' must be an array of objects", "data")]
        if not data:
            return [], True, [Problem("bad_body", "'data' is empty", "data")]
        return data, True, []
    if isinstance(body, dict):
        return [body], False, []
    return [], False, [Problem("bad_body", "expected a JSON object or {\"data\": [...]}")]


def item_path(batch: bool, index: int) -> str:
    return f"data[{index}]" if batch else ""
