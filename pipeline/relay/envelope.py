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
    t = _plain(t)
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
    if base == "record":  # e.g. Debezium's VariableScaleDecimal {scale, value}
        return record_writer(t)
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
        t = _plain(f["type"])
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
    """A type without the decoration that does not change its encoding: Kafka Connect's
    ``connect.*`` properties and docs (Debezium's semantic names); a bare primitive becomes its
    name."""
    if isinstance(t, list):
        return [_plain(b) for b in t]
    if not isinstance(t, dict):
        return t
    kept = {k: v for k, v in t.items() if not k.startswith("connect.") and k != "doc"}
    if set(kept) == {"type"} and isinstance(kept["type"], str) and kept["type"] in _PRIMITIVE:
        return kept["type"]
    return kept


def envelope_writer(schema: dict[str, Any], constants: dict[str, str]) -> Writer | None:
    """A writer for values of ``schema`` (the envelope), whose ``source`` fields named in
    ``constants`` always hold those values; None when the schema is not a shape it knows.

    Generated from the schema like :func:`record_writer`, so a field added to the envelope or to
    ``source`` (Debezium's ``ts_us``, ``lsn``, ...) keeps the fast path instead of silently
    falling back to fastavro; the unit test checks it byte for byte."""
    fields = schema.get("fields", [])
    if [f["name"] for f in fields[:3]] != ["before", "after", "source"]:
        return None
    types = {f["name"]: f["type"] for f in fields}
    before, after, source = types["before"], types["after"], types["source"]
    if not (isinstance(before, list) and len(before) == 2 and before[0] == "null"
            and isinstance(before[1], dict) and before[1].get("type") == "record"
            and isinstance(after, list) and len(after) == 2 and after[0] == "null"
            and after[1] in (before[1].get("name"),
                             f"{before[1].get('namespace')}.{before[1].get('name')}")):
        return None
    if not isinstance(source, dict) or source.get("type") != "record":
        return None
    source_fields = source.get("fields", [])
    if not set(constants) <= {f["name"] for f in source_fields}:
        return None
    record = fastavro.parse_schema(before[1])
    fast_record = record_writer(before[1])
    env: dict[str, Any] = {"_long": _long, "_string": _string, "_bytes": _bytes,
                           "_FLOAT": _FLOAT, "_DOUBLE": _DOUBLE, "_record": fast_record,
                           "_fastavro": fastavro.schemaless_writer, "_parsed": record,
                           "_io": io, "_C": dict(constants)}
    lines = ["def write(value):", "    out = []", "    a = out.append"]
    for side in ("before", "after"):
        lines += [f"    x = value[{side!r}]", "    if x is None:", '        a(b"\\x00")',
                  "    else:", '        a(b"\\x02")']
        if fast_record is not None:
            lines.append("        a(_record(x))")
        else:
            lines += ["        buf = _io.BytesIO()", "        _fastavro(buf, _parsed, x)",
                      "        a(buf.getvalue())"]
    lines.append('    src = value["source"]')
    n = 0

    def step(indent: str, getter: str, t: Any) -> list[str] | None:
        nonlocal n
        n += 1
        t = _plain(t)
        nullable = isinstance(t, list) and len(t) == 2 and t[0] == "null"
        expr = _expression(_plain(t[1]) if nullable else t, n, env)
        if expr is None:
            return None
        out = [f"{indent}x = {getter}"]
        if nullable:
            return [*out, f"{indent}if x is None:", f'{indent}    a(b"\\x00")',
                    f"{indent}else:", f'{indent}    a(b"\\x02")', f"{indent}    a({expr})"]
        return [*out, f"{indent}a({expr})"]

    for f in source_fields:
        name = f["name"]
        if name in constants:
            if _plain(f["type"]) != "string":
                return None
            env[f"_c{name}"] = _string(constants[name])
            lines += [f"    if src[{name!r}] != _C[{name!r}]:",
                      '        raise ValueError("source field differs from the writer\'s '
                      'constants")', f"    a(_c{name})"]
            continue
        got = step("    ", f"src.get({name!r})", f["type"])
        if got is None:
            return None
        lines += got
    for f in fields[3:]:
        got = step("    ", f"value.get({f['name']!r})", f["type"])
        if got is None:
            return None
        lines += got
    lines.append('    return b"".join(out)')
    exec(compile("\n".join(lines), "<dx envelope writer>", "exec"), env)  # noqa: S102
    return env["write"]  # type: ignore[no-any-return]


def uuid5_text(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(UUID(bytes=namespace), name))`` without building UUID objects (one
    per event on the relay's hot path)."""
    h = bytearray(hashlib.sha1(namespace + name.encode(), usedforsecurity=False).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50
    h[8] = (h[8] & 0x3F) | 0x80
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"
