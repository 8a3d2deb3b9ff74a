"""Avro schemas for captured tables, generated from their :class:`TableSpec`.

The value is a Debezium-compatible envelope (``before``, ``after``, ``source``, ``op``, ``ts_ms``)
plus dx's ``event_id`` and ``origin``, so existing Debezium consumers read our topics. Names follow
Debezium: namespace ``<prefix>.<schema>.<table>``, records ``Key``, ``Value``, ``Envelope``.

Every value field is a ``["null", T]`` union with default null. PostgreSQL NOT NULL is not
carried into the schema on purpose: it keeps column additions and removals BACKWARD and FORWARD
compatible, which lets the relay evolve a topic without stopping (decision recorded in README).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from pipeline.capture.spec import ColumnSpec, TableSpec

Converter = Callable[[Any], Any]

_UTC = dt.UTC

# typname -> Avro type. Anything not listed is carried as its text form.
_SIMPLE: dict[str, Any] = {
    "bool": "boolean",
    "int2": "int",
    "int4": "int",
    "int8": "long",
    "oid": "long",
    "float4": "float",
    "float8": "double",
    "text": "string",
    "varchar": "string",
    "bpchar": "string",
    "name": "string",
    "citext": "string",
    "uuid": {"type": "string", "logicalType": "uuid"},
    "date": {"type": "int", "logicalType": "date"},
    "time": {"type": "long", "logicalType": "time-micros"},
    "timestamp": {"type": "long", "logicalType": "local-timestamp-micros"},
    "timestamptz": {"type": "long", "logicalType": "timestamp-micros"},
    "bytea": "bytes",
    "json": {"type": "string", "connect.name": "io.debezium.data.Json"},
    "jsonb": {"type": "string", "connect.name": "io.debezium.data.Json"},
}


def avro_type(col: ColumnSpec) -> Any:
    """The Avro type of one column (without the null union)."""
    if col.type == "numeric":
        if col.precision is not None and col.scale is not None:
            base: Any = {"type": "bytes", "logicalType": "decimal",
                         "precision": col.precision, "scale": col.scale}
        else:
            base = {"type": "string", "connect.name": "dx.Numeric"}  # unconstrained numeric
    else:
        base = _SIMPLE.get(col.type, "string")
    if col.is_array:
        return {"type": "array", "items": ["null", base]}
    return base


def _to_datetime(v: str) -> dt.datetime:
    if v == "infinity":
        return dt.datetime.max.replace(tzinfo=_UTC)
    if v == "-infinity":
        return dt.datetime.min.replace(tzinfo=_UTC)
    return dt.datetime.fromisoformat(v)


def _to_local_datetime(v: str) -> dt.datetime:
    if v in ("infinity", "-infinity"):
        return (dt.datetime.max if v == "infinity" else dt.datetime.min)
    return dt.datetime.fromisoformat(v)


def _to_date(v: str) -> dt.date:
    if v in ("infinity", "-infinity"):
        return dt.date.max if v == "infinity" else dt.date.min
    return dt.date.fromisoformat(v)


def _finite(d: Decimal) -> Decimal:
    """PostgreSQL numeric allows NaN and ±Infinity; an Avro decimal has no such values."""
    if not d.is_finite():
        raise ValueError(f"{d} has no Avro decimal form")
    return d


def _scalar_converter(col: ColumnSpec) -> Converter | None:
    """JSON value (as jsonb_build_object produced it) -> the Python value fastavro encodes.
    None means the JSON value is already right."""
    t = col.type
    if t == "numeric":
        if col.scale is not None:
            q = Decimal(1).scaleb(-col.scale)
            return lambda v: _finite(Decimal(v)).quantize(q)
        return lambda v: str(v)
    if t in ("float4", "float8"):
        return lambda v: float(v)
    if t == "timestamptz":
        return _to_datetime
    if t == "timestamp":
        return _to_local_datetime
    if t == "date":
        return _to_date
    if t == "time":
        return dt.time.fromisoformat
    if t == "bytea":
        return lambda v: bytes.fromhex(v[2:]) if v.startswith("\\x") else base64.b64decode(v)
    if t in ("json", "jsonb"):
        return lambda v: json.dumps(v, separators=(",", ":"), default=str)
    if t in _SIMPLE:
        return None
    return lambda v: v if isinstance(v, str) else json.dumps(v, default=str)


def column_converter(col: ColumnSpec) -> Converter | None:
    scalar = _scalar_converter(col)
    if not col.is_array or scalar is None:
        if col.is_array and scalar is None:
            return None
        return scalar
    return lambda vs: [None if v is None else scalar(v) for v in vs]


def row_converter(columns: tuple[ColumnSpec, ...]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Build a function that turns a captured JSON row into an Avro-ready dict."""
    convs = [(c.name, avro_name(c.name), column_converter(c)) for c in columns]

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, field, conv in convs:
            v = row.get(name)
            try:
                out[field] = v if v is None or conv is None else conv(v)
            except (ValueError, TypeError, ArithmeticError) as err:
                raise ValueError(f"column {name}: {v!r}: {err}") from None
        return out

    return convert


_INVALID = re.compile(r"[^A-Za-z0-9_]")


def avro_name(name: str) -> str:
    """A column or schema name made valid for Avro (Debezium's 'avro' adjustment mode)."""
    fixed = _INVALID.sub("_", name)
    return "_" + fixed if not fixed or fixed[0].isdigit() else fixed


def namespace(prefix: str, spec: TableSpec) -> str:
    return ".".join(avro_name(p) for p in (*prefix.split("."), spec.schema, spec.table))


def key_schema(spec: TableSpec, prefix: str) -> dict[str, Any]:
    fields = []
    for c in spec.key_columns:
        t = avro_type(c)
        fields.append({"name": avro_name(c.name), "type": ["null", t] if c.nullable else t})
    return {"type": "record", "name": "Key", "namespace": namespace(prefix, spec),
            "fields": fields}


SOURCE_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Source",
    "namespace": "dx",
    "fields": [
        {"name": "version", "type": "string"},
        {"name": "connector", "type": "string"},
        {"name": "name", "type": "string"},
        {"name": "ts_ms", "type": "long"},
        {"name": "snapshot", "type": ["null", "string"], "default": None},
        {"name": "db", "type": "string"},
        {"name": "schema", "type": "string"},
        {"name": "table", "type": "string"},
        {"name": "txId", "type": ["null", "long"], "default": None},
        {"name": "sequence", "type": ["null", "string"], "default": None},
    ],
}


def value_schema(spec: TableSpec, prefix: str) -> dict[str, Any]:
    """The Debezium-style envelope for one table."""
    ns = namespace(prefix, spec)
    value_record = {
        "type": "record",
        "name": "Value",
        "namespace": ns,
        "fields": [{"name": avro_name(c.name), "type": ["null", avro_type(c)], "default": None}
                   for c in spec.columns],
    }
    return {
        "type": "record",
        "name": "Envelope",
        "namespace": ns,
        "fields": [
            {"name": "before", "type": ["null", value_record], "default": None},
            {"name": "after", "type": ["null", f"{ns}.Value"], "default": None},
            {"name": "source", "type": SOURCE_SCHEMA},
            {"name": "op", "type": "string"},
            {"name": "ts_ms", "type": ["null", "long"], "default": None},
            {"name": "event_id", "type": {"type": "string", "logicalType": "uuid"}},
            {"name": "origin", "type": ["null", "string"], "default": None},
        ],
    }


OUTBOX_EVENT_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "OutboxEvent",
    "namespace": "dx",
    "doc": "An application-written event (Debezium outbox shape); payload is JSON text.",
    "fields": [
        {"name": "event_id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "aggregatetype", "type": "string"},
        {"name": "aggregateid", "type": "string"},
        {"name": "type", "type": "string"},
        {"name": "payload", "type": ["null", "string"], "default": None},
        {"name": "ts_ms", "type": "long"},
        {"name": "origin", "type": ["null", "string"], "default": None},
    ],
}

OUTBOX_KEY_SCHEMA: dict[str, Any] = {"type": "string"}
