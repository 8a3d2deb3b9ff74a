"""Avro schemas for captured tables, generated from their :class:`TableSpec`.

The value is a Debezium-compatible envelope (``before``, ``after``, ``source``, ``op``, ``ts_ms``)
plus dx's ``event_id`` and ``origin``, so existing Debezium consumers read our topics. Names follow
Debezium: namespace ``<prefix>.<schema>.<table>``, records ``Key``, ``Value``, ``Envelope``.

Column types carry Debezium's semantic type names (``connect.name``) or Debezium's own
representation where a name alone is not enough (timestamptz, timetz, interval, unconstrained
numeric), so Kafka Connect's Avro converters hand Debezium's sinks the types they know; a plain
Avro reader still gets plain values. The table of what each PostgreSQL type becomes is in the
README ("Reading dx topics with other tools"); :func:`python_values` turns the Debezium
representations back into Python values for dx's own decoders.

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
from decimal import Context, Decimal
from typing import Any

from pipeline.capture.spec import ColumnSpec, TableSpec, avro_name

Converter = Callable[[Any], Any]

_UTC = dt.UTC

ZONED_TIMESTAMP = "io.debezium.time.ZonedTimestamp"
ZONED_TIME = "io.debezium.time.ZonedTime"
MICRO_DURATION = "io.debezium.time.MicroDuration"
VARIABLE_SCALE_DECIMAL = "io.debezium.data.VariableScaleDecimal"


def _debezium(avro: str, name: str, **extra: Any) -> dict[str, Any]:
    """An Avro type named as Debezium's converters name it (Kafka Connect reads `connect.name`)."""
    return {"type": avro, **extra, "connect.version": 1, "connect.name": name}


# typname -> Avro type. Anything not listed is carried as its text form.
_SIMPLE: dict[str, Any] = {
    "bool": "boolean",
    "int2": {"type": "int", "connect.type": "int16"},
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
    "uuid": _debezium("string", "io.debezium.data.Uuid", logicalType="uuid"),
    # Avro's date logical type is Kafka Connect's Date already (a name would clash with it).
    "date": {"type": "int", "logicalType": "date"},
    "time": _debezium("long", "io.debezium.time.MicroTime", logicalType="time-micros"),
    "timestamp": _debezium("long", "io.debezium.time.MicroTimestamp",
                           logicalType="local-timestamp-micros"),
    "timestamptz": _debezium("string", ZONED_TIMESTAMP),
    "timetz": _debezium("string", ZONED_TIME),
    "interval": _debezium("long", MICRO_DURATION),
    "bytea": "bytes",
    "json": _debezium("string", "io.debezium.data.Json"),
    "jsonb": _debezium("string", "io.debezium.data.Json"),
}

# Unconstrained numeric: Debezium's struct of scale and unscaled two's-complement big-endian bytes.
_VARIABLE_SCALE_DECIMAL: dict[str, Any] = {
    "type": "record", "name": "VariableScaleDecimal", "namespace": "io.debezium.data",
    "fields": [{"name": "scale", "type": "int"}, {"name": "value", "type": "bytes"}],
    "connect.doc": "Variable scaled decimal", "connect.version": 1,
    "connect.name": VARIABLE_SCALE_DECIMAL,
}

_ENUM = _debezium("string", "io.debezium.data.Enum")

# Types whose exact PostgreSQL type a sink can only learn from Debezium's propagated source type
# (`column.propagate.source.type`): Debezium's JDBC sink then creates jsonb, varchar(n), char(n).
_SOURCE_TYPED = {"jsonb": "JSONB", "varchar": "VARCHAR", "bpchar": "BPCHAR"}


def _source_typed(col: ColumnSpec) -> dict[str, Any]:
    base = _SIMPLE[col.type]
    plain: dict[str, Any] = {"type": base} if isinstance(base, str) else dict(base)
    params = {"__debezium.source.column.type": _SOURCE_TYPED[col.type]}
    if col.precision is not None:
        params["__debezium.source.column.length"] = str(col.precision)
    return {**plain, "connect.parameters": params}


def avro_type(col: ColumnSpec) -> Any:
    """The Avro type of one column (without the null union). A schema with two unconstrained
    numerics must define the named record once: pass it through :func:`define_once`."""
    if col.type == "numeric":
        if col.precision is not None and col.scale is not None:
            base: Any = {"type": "bytes", "logicalType": "decimal",
                         "precision": col.precision, "scale": col.scale}
        else:
            base = dict(_VARIABLE_SCALE_DECIMAL)
    elif col.category == "E" and col.type not in _SIMPLE:
        base = _ENUM
    elif col.type in _SOURCE_TYPED:
        base = _source_typed(col)
    else:
        base = _SIMPLE.get(col.type, "string")
    if col.is_array:
        return {"type": "array", "items": ["null", base]}
    return base


def define_once(schema: Any, seen: set[str] | None = None) -> Any:
    """The schema with each named type defined at its first use and referenced by full name
    after (Avro allows one definition per name)."""
    seen = set() if seen is None else seen
    if isinstance(schema, list):
        return [define_once(s, seen) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get("type") == "record":
        full = f"{schema['namespace']}.{schema['name']}" if "namespace" in schema \
            else schema["name"]
        if full in seen:
            return full
        seen.add(full)
        return {**schema, "fields": [{**f, "type": define_once(f["type"], seen)}
                                     for f in schema["fields"]]}
    if schema.get("type") == "array":
        return {**schema, "items": define_once(schema["items"], seen)}
    return schema


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


def zoned_timestamp(v: dt.datetime | str) -> str:
    """Debezium's ZonedTimestamp: ISO-8601 in UTC with a `Z`, fraction without trailing zeros.
    PostgreSQL's `infinity`/`-infinity` pass as those words."""
    if isinstance(v, str):
        if v in ("infinity", "-infinity"):
            return v
        v = dt.datetime.fromisoformat(v)
    if v.tzinfo is None:
        raise ValueError(f"{v} has no time zone")
    text = v.astimezone(_UTC).replace(tzinfo=None).isoformat()
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text + "Z"


_TZ_SUFFIX = re.compile(r"([+-])(\d{2})(?::?(\d{2}))?(?::?(\d{2}))?$")


def zoned_time(v: dt.time | str) -> str:
    """Debezium's ZonedTime: ISO-8601 time with offset (PostgreSQL's `04:05:06+02` becomes
    `04:05:06+02:00`; the offset is kept, so the value compares equal in a replica)."""
    if isinstance(v, dt.time):
        return v.isoformat()
    m = _TZ_SUFFIX.search(v)
    if m is None:
        raise ValueError(f"{v!r} is not a time with time zone")
    sign, hh, mm, ss = m.groups()
    offset = f"{sign}{hh}:{mm or '00'}" + (f":{ss}" if ss else "")
    return v[: m.start()] + offset


_INTERVAL_UNITS = {"year": 12, "mon": 1, "day": 0}
_INTERVAL_PART = re.compile(r"([+-]?\d+) (year|mon|day)s?|([+-])?(\d+):(\d{2}):(\d{2}(?:\.\d+)?)")
_MICROS_PER_DAY = 86_400_000_000


def micro_duration(v: dt.timedelta | str) -> int:
    """Debezium's MicroDuration: the interval in microseconds, a month counted as 30 days and a
    year as 12 months (PostgreSQL's own rule when it compares intervals, so the value a sink
    writes back compares equal). Reads PostgreSQL's default `IntervalStyle` (postgres)."""
    if isinstance(v, dt.timedelta):
        return v // dt.timedelta(microseconds=1)
    months = days = micros = 0
    pos = 0
    text = v.strip()
    for m in _INTERVAL_PART.finditer(text):
        if text[pos:m.start()].strip():
            break
        pos = m.end()
        if m.group(2):
            n = int(m.group(1))
            if m.group(2) == "day":
                days += n
            else:
                months += n * _INTERVAL_UNITS[m.group(2)]
        else:
            sign = -1 if m.group(3) == "-" else 1
            seconds = Decimal(m.group(6)) + 60 * int(m.group(5)) + 3600 * int(m.group(4))
            micros += sign * int(seconds * 1_000_000)
    if text[pos:].strip() or not text:
        raise ValueError(f"{v!r} is not an interval in IntervalStyle postgres")
    return (months * 30 + days) * _MICROS_PER_DAY + micros


def variable_scale_decimal(v: Decimal | int | str) -> dict[str, Any]:
    """Debezium's VariableScaleDecimal: {scale, unscaled value as big-endian two's complement},
    exact at any size (no decimal context rounds it). NaN and ±Infinity have no such form (the
    relay stops on the row, naming it)."""
    sign, digits, exponent = _finite(Decimal(v) if not isinstance(v, Decimal) else v).as_tuple()
    assert isinstance(exponent, int)  # finite
    unscaled = int("".join(map(str, digits)) or "0") * 10 ** max(0, exponent)
    unscaled = -unscaled if sign else unscaled
    size = max(1, (unscaled.bit_length() + 8) // 8)
    return {"scale": max(0, -exponent), "value": unscaled.to_bytes(size, "big", signed=True)}


def _from_variable_scale_decimal(v: dict[str, Any]) -> Decimal:
    t = Decimal(int.from_bytes(v["value"], "big", signed=True)).as_tuple()
    return Decimal((t.sign, t.digits, -int(v["scale"])))


def _numeric(col: ColumnSpec) -> Converter:
    if col.scale is not None:
        q = Decimal(1).scaleb(-col.scale)
        # room for every digit numeric(p, s) holds (the default context keeps 28)
        exact = Context(prec=max(28, (col.precision or 0) + 1))
        return lambda v: _finite(Decimal(v)).quantize(q, context=exact)
    return variable_scale_decimal


def json_text(v: Any) -> str:
    """Compact JSON text of a value read from jsonb (numbers arrive as exact Decimals; they stay
    numbers, where json.dumps would need them turned into floats or strings)."""
    if isinstance(v, Decimal):
        if not v.is_finite():
            raise ValueError(f"{v} is not a JSON number")
        return str(v)
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{json_text(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(json_text(x) for x in v) + "]"
    return json.dumps(v)


def _scalar_converter(col: ColumnSpec) -> Converter | None:
    """JSON value (as jsonb_build_object produced it) -> the Python value fastavro encodes.
    None means the JSON value is already right."""
    t = col.type
    if t == "numeric":
        return _numeric(col)
    if t in ("float4", "float8"):
        return lambda v: float(v)
    if t == "timestamptz":
        return zoned_timestamp
    if t == "timetz":
        return zoned_time
    if t == "interval":
        return micro_duration
    if t == "timestamp":
        return _to_local_datetime
    if t == "date":
        return _to_date
    if t == "time":
        return dt.time.fromisoformat
    if t == "bytea":
        return lambda v: bytes.fromhex(v[2:]) if v.startswith("\\x") else base64.b64decode(v)
    if t in ("json", "jsonb"):
        return json_text
    if t in _SIMPLE:
        return None
    return lambda v: v if isinstance(v, str) else json.dumps(v, default=str)


def python_converter(col: ColumnSpec) -> Converter | None:
    """Typed Python value (what a CSV importer validated) -> the Avro datum of the column, for
    the types whose Avro form is Debezium's representation rather than the value itself."""
    t = col.type
    scalar: Converter | None = None
    if t == "numeric" and col.scale is None:
        scalar = variable_scale_decimal
    elif t == "timestamptz":
        scalar = zoned_timestamp
    elif t == "timetz":
        scalar = zoned_time
    elif t == "interval":
        scalar = micro_duration
    if scalar is None or not col.is_array:
        return scalar
    return lambda vs: [None if v is None else scalar(v) for v in vs]


def column_converter(col: ColumnSpec) -> Converter | None:
    scalar = _scalar_converter(col)
    if not col.is_array or scalar is None:
        if col.is_array and scalar is None:
            return None
        return scalar
    return lambda vs: [None if v is None else scalar(v) for v in vs]


def _from_zoned_timestamp(v: str) -> dt.datetime:
    if v in ("infinity", "-infinity"):
        return _to_datetime(v)
    return dt.datetime.fromisoformat(v.replace("Z", "+00:00"))


# connect.name -> Avro datum back to the Python value dx's decoders hand on.
_BACK: dict[str, Converter] = {
    ZONED_TIMESTAMP: _from_zoned_timestamp,
    VARIABLE_SCALE_DECIMAL: _from_variable_scale_decimal,
    MICRO_DURATION: lambda v: dt.timedelta(microseconds=v),
}


def python_values(schema: Any) -> Converter | None:
    """A function turning a datum fastavro read with `schema` (parsed JSON of the writer schema)
    into plain Python values: Debezium's representations of timestamptz, unconstrained numeric
    and interval become datetime, Decimal and timedelta. None when the schema has none."""
    named: dict[str, Converter | None] = {}

    def build(s: Any, ns: str | None) -> Converter | None:
        if isinstance(s, str):
            return named.get(s if "." in s or ns is None else f"{ns}.{s}", named.get(s))
        if isinstance(s, list):
            branches = [c for c in (build(b, ns) for b in s) if c is not None]
            if not branches:
                return None
            return branches[0] if len(branches) == 1 else None
        if not isinstance(s, dict):
            return None
        back = _BACK.get(str(s.get("connect.name")))
        if back is not None:
            if s.get("type") == "record":
                named[f"{s.get('namespace', ns)}.{s['name']}"] = back
            return lambda v: None if v is None else back(v)
        t = s.get("type")
        if t == "array":
            item = build(s["items"], ns)
            return None if item is None else (
                lambda v: None if v is None else [None if x is None else item(x) for x in v])
        if t == "record":
            own = s.get("namespace", ns)
            full = f"{own}.{s['name']}" if own else s["name"]
            named[full] = None
            fields = [(f["name"], build(f["type"], own)) for f in s["fields"]]
            convs = [(n, c) for n, c in fields if c is not None]
            if not convs:
                return None

            def record(v: Any) -> Any:
                if not isinstance(v, dict):
                    return v
                out = dict(v)
                for n, c in convs:
                    if out.get(n) is not None:
                        out[n] = c(out[n])
                return out

            named[full] = record
            return record
        if isinstance(t, dict | list):
            return build(t, ns)
        return None

    return build(schema, None)


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


def namespace(prefix: str, spec: TableSpec) -> str:
    return ".".join(avro_name(p) for p in (*prefix.split("."), spec.schema, spec.table))


def key_schema(spec: TableSpec, prefix: str) -> dict[str, Any]:
    fields = []
    for c in spec.key_columns:
        t = avro_type(c)
        fields.append({"name": avro_name(c.name), "type": ["null", t] if c.nullable else t})
    key: dict[str, Any] = define_once({"type": "record", "name": "Key",
                                       "namespace": namespace(prefix, spec), "fields": fields})
    return key


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
        # Debezium's names for what its consumers read: commit time in microseconds, and the
        # commit's WAL position (logical capture only; null from trigger capture).
        {"name": "ts_us", "type": ["null", "long"], "default": None},
        {"name": "lsn", "type": ["null", "long"], "default": None},
    ],
}


def value_schema(spec: TableSpec, prefix: str) -> dict[str, Any]:
    """The Debezium-style envelope for one table."""
    ns = namespace(prefix, spec)
    value_record: dict[str, Any] = define_once({
        "type": "record",
        "name": "Value",
        "namespace": ns,
        "fields": [{"name": avro_name(c.name), "type": ["null", avro_type(c)], "default": None}
                   for c in spec.columns],
    })
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
            {"name": "ts_us", "type": ["null", "long"], "default": None},
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
