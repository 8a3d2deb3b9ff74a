"""Filter and map one decoded change event, as declared by a route.

Both are compiled once per route (:class:`RouteLogic`) so the per-event cost is a few dict look-ups.
A mapping that cannot be applied to an event (a value that does not convert, a template over a
missing object) raises :class:`MappingError`: the event is poison for this route and goes dead
with the reason; the worker keeps going.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from pipeline.config.sinks import Condition, FieldMap, SinkRoute
from pipeline.errors import TerminalError
from pipeline.templates import Part, dig, parse, render


class MappingError(TerminalError):
    """The route's mapping or filter cannot be applied to this event."""


@dataclass(frozen=True)
class Event:
    """A decoded change event (Debezium envelope) with where it came from."""

    topic: str
    partition: int
    offset: int
    key: dict[str, Any]
    value: dict[str, Any]

    @property
    def op(self) -> str:
        return str(self.value.get("op"))

    @property
    def before(self) -> dict[str, Any] | None:
        return self.value.get("before")

    @property
    def after(self) -> dict[str, Any] | None:
        return self.value.get("after")

    @property
    def row(self) -> dict[str, Any] | None:
        """The current image: ``after``, or ``before`` for a delete."""
        return self.before if self.op == "d" else self.after

    @property
    def event_id(self) -> str:
        return str(self.value.get("event_id"))

    @property
    def origin(self) -> str | None:
        o = self.value.get("origin")
        return None if o is None else str(o)

    @property
    def table(self) -> str:
        src = self.value.get("source") or {}
        if src.get("schema") and src.get("table"):
            return f"{src['schema']}.{src['table']}"
        return ""

    def resolve(self, path: str) -> Any:
        """Value of a source path (see pipeline/config/sinks.py)."""
        if path[0] != "$":
            return dig(self.row, path)
        head, _, rest = path.partition(".")
        if head == "$after":
            return dig(self.after, rest)
        if head == "$before":
            return dig(self.before, rest)
        if head == "$key":
            return dig(self.key, rest)
        src = self.value.get("source") or {}
        meta: dict[str, Any] = {
            "$op": self.op, "$event_id": self.event_id, "$origin": self.origin,
            "$table": self.table, "$schema": src.get("schema"), "$topic": self.topic,
            "$ts_ms": self.value.get("ts_ms"), "$source_ts_ms": src.get("ts_ms"),
        }
        return meta.get(path)


def jsonable(v: Any) -> Any:
    """A decoded Avro value in a form JSON (and most targets) accept without losing data.

    Decimals become JSON numbers when a float holds them exactly (prices), text otherwise;
    timestamps ISO 8601 (UTC with ``Z``), dates ISO, bytes base64, UUIDs text.
    """
    if v is None or isinstance(v, str | bool | int | float):
        return v
    if isinstance(v, Decimal):
        f = float(v)
        return f if Decimal(repr(f)) == v else str(v)
    if isinstance(v, dt.datetime):
        if v.tzinfo is not None:
            return v.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
        return v.isoformat()
    if isinstance(v, dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(v)).decode()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    return str(v)


_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}


def convert(value: Any, kind: str) -> Any:
    """Type conversion of ``fields.<name>.type``; ValueError/TypeError when impossible."""
    if value is None:
        return None
    if kind == "string":
        j = jsonable(value)
        return j if isinstance(j, str) else json.dumps(j) if isinstance(j, dict | list) else str(j)
    if kind == "int":
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, str):
            value = Decimal(value.strip())
        if isinstance(value, Decimal | float) and value != int(value):
            raise ValueError(f"{value} is not a whole number")
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "decimal":
        try:
            return str(Decimal(str(value)))
        except InvalidOperation:
            raise ValueError(f"{value!r} is not a decimal number") from None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float | Decimal):
            return value != 0
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"{value!r} is not a boolean")
    if kind == "date":
        if isinstance(value, dt.datetime):
            return value.date().isoformat()
        if isinstance(value, dt.date):
            return value.isoformat()
        text = str(value).strip()
        if len(text) > 10:
            return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).date().isoformat()
        return dt.date.fromisoformat(text).isoformat()
    if kind in ("datetime", "epoch_ms"):
        if isinstance(value, dt.datetime):
            ts = value
        elif isinstance(value, dt.date):
            ts = dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
        elif isinstance(value, int | float | Decimal):
            ts = dt.datetime.fromtimestamp(float(value) / 1000, dt.UTC)
        else:
            ts = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=dt.UTC)
        if kind == "epoch_ms":
            return int(ts.timestamp() * 1000)
        return jsonable(ts)
    if kind == "json":
        return json.loads(value) if isinstance(value, str | bytes) else jsonable(value)
    raise ValueError(f"unknown type {kind}")


def _comparable(value: Any, operand: Any) -> tuple[Any, Any]:
    if isinstance(value, Decimal) and isinstance(operand, float):
        return float(value), operand
    if isinstance(value, dt.datetime) and isinstance(operand, str):
        other = dt.datetime.fromisoformat(operand.replace("Z", "+00:00"))
        if value.tzinfo is not None and other.tzinfo is None:
            other = other.replace(tzinfo=dt.UTC)
        return value, other
    if isinstance(value, dt.date) and isinstance(operand, str):
        return value, dt.date.fromisoformat(operand)
    if isinstance(value, uuid.UUID):
        return str(value), operand
    return value, operand


def _holds(cond: Condition, event: Event) -> bool:
    op = cond.operator
    if op == "changed":
        if event.op != "u":
            return bool(cond.changed)
        name = cond.field.split(".", 1)[1] if cond.field.startswith("$") else cond.field
        differs = dig(event.before, name) != dig(event.after, name)
        return bool(differs) == bool(cond.changed)
    value = event.resolve(cond.field)
    if op == "exists":
        return (value is not None) == bool(cond.exists)
    operand = cond.operand
    if op in ("in", "not_in"):
        hit = any(_comparable(value, o)[0] == _comparable(value, o)[1] for o in operand)
        return hit if op == "in" else not hit
    if op in ("eq", "ne"):
        a, b = _comparable(value, operand)
        return bool(a == b) if op == "eq" else bool(a != b)
    if value is None:
        return False
    a, b = _comparable(value, operand)
    try:
        if op == "gt":
            return bool(a > b)
        if op == "ge":
            return bool(a >= b)
        if op == "lt":
            return bool(a < b)
        return bool(a <= b)
    except TypeError:
        raise MappingError(f"filter {cond.field} {op} {operand!r}: cannot compare "
                           f"{type(value).__name__} with {type(operand).__name__}") from None


Producer = Callable[[Event], Any]


def _field_producer(target: str, fm: FieldMap) -> Producer:
    if fm.template is not None:
        parts: list[Part] = parse(fm.template)

        def produce(e: Event) -> Any:
            return render(parts, lambda p: jsonable(e.resolve(p)))
    elif fm.from_ is not None:
        path = fm.from_

        def produce(e: Event) -> Any:
            return e.resolve(path)
    else:
        const = fm.const

        def produce(e: Event) -> Any:
            return const

    kind, default = fm.type, fm.default

    def with_type(e: Event) -> Any:
        v = produce(e)
        if v is None:
            v = default
        if kind is None or v is None:
            return jsonable(v)
        try:
            return convert(v, kind)
        except (ValueError, TypeError, ArithmeticError, json.JSONDecodeError) as err:
            raise MappingError(f"mapping {target}: cannot convert {jsonable(v)!r} to "
                               f"{kind}: {err}") from None

    return with_type


class RouteLogic:
    """The compiled filter and mapping of one route."""

    def __init__(self, route: SinkRoute) -> None:
        self.route = route
        f = route.filter
        self.ops = set(f.ops) if f.ops is not None else None
        self.origins = set(f.origins) if f.origins is not None else None
        self.excluded = set(f.exclude_origins)
        self.where = list(f.where)
        m = route.mapping
        self.select = list(m.select) if m.select is not None else None
        self.fields = [(target.split("."), _field_producer(target, fm))
                       for target, fm in m.fields.items()]
        self.drop_nulls = m.drop_nulls
        self.passthrough = self.select is None and not self.fields

    def skip_reason(self, event: Event) -> str | None:
        """Why this route does not deliver the event, or None when it does."""
        origin = event.origin or "db"
        if self.route.target is not None and origin == self.route.target:
            return f"echo: origin {origin!r} is this route's target"
        if origin in self.excluded:
            return f"origin {origin!r} is excluded"
        if self.origins is not None and origin not in self.origins:
            return f"origin {origin!r} is not in filter.origins"
        if self.ops is not None and event.op not in self.ops:
            return f"op {event.op!r} is not in filter.ops"
        for cond in self.where:
            if not _holds(cond, event):
                return f"filter: {cond.field} {cond.operator} {cond.operand!r} does not hold"
        return None

    def map(self, event: Event) -> dict[str, Any] | None:
        """The payload for the connector; None for a delete without a ``before`` image."""
        row = event.row
        if self.passthrough:
            return None if row is None else {k: jsonable(v) for k, v in row.items()}
        if row is None and event.op == "d" and self.select is not None and not self.fields:
            return None
        out: dict[str, Any] = {}
        for name in self.select or []:
            out[name.rsplit(".", 1)[-1]] = jsonable(event.resolve(name))
        for parts, produce in self.fields:
            value = produce(event)
            if value is None and self.drop_nulls:
                continue
            node = out
            for p in parts[:-1]:
                nxt = node.setdefault(p, {})
                if not isinstance(nxt, dict):
                    raise MappingError(f"mapping {'.'.join(parts)}: {p!r} is already a value")
                node = nxt
            node[parts[-1]] = value
        if self.drop_nulls:
            out = {k: v for k, v in out.items() if v is not None}
        return out
