"""A per-table writer for the change-event envelope, built once per table and schema version.

fastavro resolves every ``["null", record]`` union by validating the whole record against each
branch (~11 µs a row), looks its schema up on every call, and re-encodes constants (connector,
database, schema, table) on every row. This writer is derived from the registered envelope
schema: one small function per field of the table's ``Value`` record (Avro's binary encoding of
its type; logical types through fastavro's own conversion functions, so values convert exactly
as fastavro converts them), the constant ``source`` fields pre-encoded, union branch indexes
written directly. Where the value record holds a type it does not cover, fastavro writes that
record; where the envelope has a shape it does not know, it returns None and the encoder uses
fastavro for everything. ``tests/unit/test_envelope.py`` checks it byte for byte against
fastavro.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Callable
from typing import Any

import fastavro

try:  # fastavro's own conversions of logical types (its pure-Python twin of the C writer)
    from fastavro._logical_writers_py import LOGICAL_WRITERS
except ImportError:  # pragma: no cover - a fastavro without it: logical types use fastavro
    LOGICAL_WRITERS = {}

Writer = Callable[[dict[str, Any]], bytes]

_ENVELOPE = ["before", "after", "source", "op", "ts_ms", "event_id", "origin"]
_SOURCE = ["version", "connector", "name", "ts_ms", "snapshot", "db", "schema", "table",
           "txId", "sequence"]
#: the Avro type each envelope/source field must have for this writer (else: fastavro)
_SOURCE_TYPES = ["string", "string", "string", "long", ["null", "string"], "string", "string",
                 "string", ["null", "long"], ["null", "string"]]


_SMALL = [bytes([i]) for i in range(128)]
_FLOAT = struct.Struct("<f").pack
_DOUBLE = struct.Struct("<d").pack


def _long(n: int) -> bytes:
    """Avro long: zigzag, then base-128 varint."""
    n = (n << 1) ^ (n >> 63)
    if n < 128:
        return _SMALL[n]
    if n < 16384:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = []
    while n > 127:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _string(s: str) -> bytes:
    b = s.encode()
    n = len(b)
    return (_SMALL[n << 1] if n < 64 else _long(n)) + b


def _bytes(b: bytes) -> bytes:
    return _long(len(b)) + b


_PRIMITIVE: dict[str, Callable[[Any], bytes]] = {
    "boolean": lambda x: b"\x01" if x else b"\x00",
    "int": _long,
    "long": _long,
    "float": _FLOAT,
    "double": _DOUBLE,
    "string": _string,
    "bytes": _bytes,
}
Field = Callable[[Any], bytes]


def _type_writer(t: Any) -> Field | None:
    """bytes of one non-null value of Avro type ``t``; None for a type not covered here."""
    if isinstance(t, str):
        return _PRIMITIVE.get(t)
    if isinstance(t, list):
        if len(t) == 2 and t[0] == "null":
            inner = _type_writer(t[1])
            if inner is None:
                return None
            return lambda x: b"\x00" if x is None else b"\x02" + inner(x)
        return None
    if not isinstance(t, dict):
        return None
    base = t.get("type")
    if base == "array":
        item = _type_writer(t.get("items"))
        if item is None:
            return None
        return lambda xs: (_long(len(xs)) + b"".join(item(x) for x in xs) + b"\x00"
                           if xs else b"\x00")
    if not isinstance(base, str) or base not in _PRIMITIVE:
        return None
    write = _PRIMITIVE[base]
    logical = t.get("logicalType")
    if logical is None:
        return write
    prepare = LOGICAL_WRITERS.get(f"{base}-{logical}")
    if prepare is None:
        return None
    return lambda x: write(prepare(x, t))


_INLINE = {"boolean": '(b"\\x01" if x else b"\\x00")', "int": "_long(x)", "long": "_long(x)",
           "float": "_FLOAT(x)", "double": "_DOUBLE(x)", "string": "_string(x)",
           "bytes": "_bytes(x)"}


def _expression(t: Any, i: int, env: dict[str, Any]) -> str | None:
    """Python source for the bytes of non-null ``x`` of type ``t`` (helpers go to ``env``)."""
    if isinstance(t, str):
        return _INLINE.get(t)
    if isinstance(t, dict) and isinstance(t.get("type"), str) and t["type"] in _INLINE \
            and "logicalType" not in t:
        return _INLINE[t["type"]]
    writer = _type_writer(t)
    if writer is None:
        return None
    env[f"_w{i}"] = writer
    return f"_w{i}(x)"


def record_writer(schema: Any) -> Field | None:
    """bytes of one value of the record ``schema``: a function generated for the record, one
    inline step per field; None when a field type is not covered (fastavro then)."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return None
    env: dict[str, Any] = {"_long": _long, "_string": _string, "_bytes": _bytes,
                           "_FLOAT": _FLOAT, "_DOUBLE": _DOUBLE}
    lines = ["def write(value):", "    get = value.get", "    out = []", "    a = out.append"]
    for i, f in enumerate(schema.get("fields", [])):
        t = f["type"]
        nullable = isinstance(t, list) and len(t) == 2 and t[0] == "null"
        expr = _expression(t[1] if nullable else t, i, env)
        if expr is None:
            return None
        lines.append(f"    x = get({f['name']!r})")
        if nullable:
            lines += ["    if x is None:", '        a(b"\\x00")', "    else:",
                      '        a(b"\\x02")', f"        a({expr})"]
        else:
            lines.append(f"    a({expr})")
    lines.append('    return b"".join(out)')
    exec(compile("\n".join(lines), f"<dx record writer {schema.get('name')}>", "exec"),  # noqa: S102
         env)
    return env["write"]  # type: ignore[no-any-return]


def _plain(t: Any) -> Any:
    """A type without logical-type decoration where it does not change the encoding."""
    if isinstance(t, dict) and t.get("type") == "string" and set(t) <= {
            "type", "logicalType", "connect.name"}:
        return "string"
    return t


def envelope_writer(schema: dict[str, Any], constants: dict[str, str]) -> Writer | None:
    """A writer for values of ``schema`` (the envelope), whose ``source`` fields named in
    ``constants`` always hold those values; None when the schema is not the known shape."""
    fields = schema.get("fields", [])
    if [f["name"] for f in fields] != _ENVELOPE:
        return None
    types = {f["name"]: f["type"] for f in fields}
    before, after, source = types["before"], types["after"], types["source"]
    if not (isinstance(before, list) and len(before) == 2 and before[0] == "null"
            and isinstance(before[1], dict) and before[1].get("type") == "record"
            and isinstance(after, list) and len(after) == 2 and after[0] == "null"
            and after[1] in (before[1].get("name"),
                             f"{before[1].get('namespace')}.{before[1].get('name')}")):
        return None
    if not isinstance(source, dict) or [f["name"] for f in source.get("fields", [])] != _SOURCE \
            or [_plain(f["type"]) for f in source["fields"]] != _SOURCE_TYPES:
        return None
    if (_plain(types["op"]), types["ts_ms"], _plain(types["event_id"]), types["origin"]) != (
            "string", ["null", "long"], "string", ["null", "string"]):
        return None
    if set(constants) != {"version", "connector", "name", "db", "schema", "table"}:
        return None
    record = fastavro.parse_schema(before[1])
    fast_record = record_writer(before[1])
    head = b"".join(_string(constants[k]) for k in ("version", "connector", "name"))
    middle = b"".join(_string(constants[k]) for k in ("db", "schema", "table"))
    write_record = fastavro.schemaless_writer

    def value_bytes(buf: io.BytesIO, value: Any) -> None:
        if value is None:
            buf.write(b"\x00")
        elif fast_record is not None:
            buf.write(b"\x02")
            buf.write(fast_record(value))
        else:
            buf.write(b"\x02")
            write_record(buf, record, value)

    def write(value: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        value_bytes(buf, value["before"])
        value_bytes(buf, value["after"])
        src = value["source"]
        if any(src[k] != constants[k] for k in constants):
            raise ValueError("source field differs from the writer's constants")
        buf.write(head)
        buf.write(_long(src["ts_ms"]))
        snap = src["snapshot"]
        buf.write(b"\x00" if snap is None else b"\x02" + _string(snap))
        buf.write(middle)
        tx = src["txId"]
        buf.write(b"\x00" if tx is None else b"\x02" + _long(tx))
        seq = src["sequence"]
        buf.write(b"\x00" if seq is None else b"\x02" + _string(seq))
        buf.write(_string(value["op"]))
        ts = value["ts_ms"]
        buf.write(b"\x00" if ts is None else b"\x02" + _long(ts))
        buf.write(_string(str(value["event_id"])))
        origin = value["origin"]
        buf.write(b"\x00" if origin is None else b"\x02" + _string(origin))
        return buf.getvalue()

    return write


def uuid5_text(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(UUID(bytes=namespace), name))`` without building UUID objects (one
    per event on the relay's hot path)."""
    h = bytearray(hashlib.sha1(namespace + name.encode(), usedforsecurity=False).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50
    h[8] = (h[8] & 0x3F) | 0x80
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"
