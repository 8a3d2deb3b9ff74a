"""An Avro writer generated per table and schema version, for the change-event envelope and key.

fastavro resolves every ``["null", record]`` union by validating the whole record against each
branch (~11 µs a row) and looks its schema up on every call. This writer is derived from the
registered schema itself, whatever it holds (records, nested and referenced by name, unions
with null, arrays, primitives, logical types): a Python function generated per record, one
inline step per field (Avro's binary encoding; logical types through fastavro's own conversion
functions, so values convert exactly as fastavro converts them), union branch indexes written
directly; a record-typed value may also be handed in already encoded (bytes), so parts that
repeat are written once. For a schema with anything else (maps, enums, fixed, other unions) it
returns None and the encoder uses fastavro. It assumes nothing about the type mapping of
:mod:`pipeline.events.avro`; ``tests/unit/test_envelope.py`` checks it byte for byte against
fastavro.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Any

try:  # fastavro's own conversions of logical types (its pure-Python twin of the C writer)
    from fastavro._logical_writers_py import LOGICAL_WRITERS
except ImportError:  # pragma: no cover - a fastavro without it: logical types use fastavro
    LOGICAL_WRITERS = {}

Writer = Callable[[Any], bytes]

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
_INLINE = {"boolean": '(b"\\x01" if x else b"\\x00")', "int": "_long(x)", "long": "_long(x)",
           "float": "_FLOAT(x)", "double": "_DOUBLE(x)", "string": "_string(x)",
           "bytes": "_bytes(x)"}


class _Unsupported(Exception):
    """A schema part this writer does not generate (fastavro writes the whole value then)."""


class _Builder:
    """Generates the writers of one schema's records; a name refers to a record defined
    before it (Avro requires the definition first)."""

    def __init__(self) -> None:
        self.named: dict[str, Writer] = {}
        self.count = 0

    def type_writer(self, t: Any, namespace: str | None) -> Writer:
        if isinstance(t, str):
            if t in _PRIMITIVE:
                return _PRIMITIVE[t]
            for name in (t if "." in t or not namespace else f"{namespace}.{t}", t):
                if name in self.named:
                    return self.named[name]
            raise _Unsupported(t)
        if isinstance(t, list):
            if len(t) == 2 and t[0] == "null":
                inner = self.type_writer(t[1], namespace)
                return lambda x: b"\x00" if x is None else b"\x02" + inner(x)
            raise _Unsupported("union")
        if not isinstance(t, dict):
            raise _Unsupported(repr(t))
        base = t.get("type")
        if base == "record":
            return self.record(t, namespace)
        if base == "array":
            item = self.type_writer(t.get("items"), namespace)
            return lambda xs: (_long(len(xs)) + b"".join(item(x) for x in xs) + b"\x00"
                               if xs else b"\x00")
        if not isinstance(base, str) or base not in _PRIMITIVE:
            raise _Unsupported(str(base))
        write = _PRIMITIVE[base]
        logical = t.get("logicalType")
        if logical is None:
            return write
        prepare = LOGICAL_WRITERS.get(f"{base}-{logical}")
        if prepare is None:
            raise _Unsupported(f"{base}-{logical}")
        return lambda x: write(prepare(x, t))

    def _expression(self, t: Any, env: dict[str, Any], namespace: str | None) -> str:
        """Python source for the bytes of a non-null ``x`` of type ``t``."""
        if isinstance(t, str) and t in _INLINE:
            return _INLINE[t]
        if isinstance(t, dict) and t.get("type") in _INLINE and "logicalType" not in t:
            return _INLINE[str(t["type"])]
        self.count += 1
        env[f"_w{self.count}"] = self.type_writer(t, namespace)
        if self._is_record(t, namespace):
            # a record may come pre-encoded (bytes are never a record's value otherwise): the
            # encoder writes parts that repeat (a transaction's source, an unchanged column)
            # once and hands their bytes in
            return f"(x if x.__class__ is bytes else _w{self.count}(x))"
        return f"_w{self.count}(x)"

    def _is_record(self, t: Any, namespace: str | None) -> bool:
        if isinstance(t, dict):
            return t.get("type") == "record"
        return isinstance(t, str) and t not in _PRIMITIVE and any(
            n in self.named for n in (t if "." in t or not namespace else f"{namespace}.{t}", t))

    def record(self, schema: dict[str, Any], namespace: str | None) -> Writer:
        name = str(schema.get("name", ""))
        ns = schema.get("namespace", namespace)
        full = name if "." in name or not ns else f"{ns}.{name}"
        env: dict[str, Any] = {"_long": _long, "_string": _string, "_bytes": _bytes,
                               "_FLOAT": _FLOAT, "_DOUBLE": _DOUBLE}
        lines = ["def write(value):", "    get = value.get", "    out = []",
                 "    a = out.append"]
        for f in schema.get("fields", []):
            t = f["type"]
            nullable = isinstance(t, list) and len(t) == 2 and t[0] == "null"
            expr = self._expression(t[1] if nullable else t, env, ns)
            lines.append(f"    x = get({f['name']!r})")
            if nullable:
                lines += ["    if x is None:", '        a(b"\\x00")', "    else:",
                          '        a(b"\\x02")', f"        a({expr})"]
            else:
                lines.append(f"    a({expr})")
        lines.append('    return b"".join(out)')
        exec(compile("\n".join(lines), f"<dx record writer {full}>", "exec"),  # noqa: S102
             env)
        write: Writer = env["write"]
        self.named[full] = write
        return write


def record_writer(schema: Any) -> Writer | None:
    """bytes of one value of the record ``schema`` (Avro binary, no framing); None when the
    schema holds a type this writer does not generate."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return None
    try:
        return _Builder().record(schema, None)
    except (_Unsupported, KeyError, TypeError):
        return None


def field_writers(schema: Any) -> list[Writer] | None:
    """One writer per field of the record ``schema`` (Avro binary of that field's value, union
    branch included): a record's bytes are its fields' bytes in order, so a caller may write
    them one by one and reuse those that repeat. None when a field has a type this module does
    not generate."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return None
    builder = _Builder()
    ns = schema.get("namespace")
    try:
        return [builder.type_writer(f["type"], ns) for f in schema.get("fields", [])]
    except (_Unsupported, KeyError, TypeError):
        return None


def uuid5_text(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(UUID(bytes=namespace), name))`` without building UUID objects (one
    per event on the relay's hot path)."""
    x = hashlib.sha1(namespace + name.encode(), usedforsecurity=False).hexdigest()
    # version 5 in the 13th digit, the RFC 4122 variant in the top bits of the 17th
    return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT[x[16]]}{x[17:20]}-{x[20:32]}"


_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}
