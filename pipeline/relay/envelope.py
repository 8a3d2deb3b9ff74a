"""A per-table writer for the change-event envelope, built once per table and schema version.

fastavro resolves every ``["null", record]`` union by validating the whole record against each
branch (~11 µs a row), and re-encodes constants (connector, database, schema, table) on every
row. This writer is derived from the registered envelope schema: it writes the union branch
indexes, the constant ``source`` fields (pre-encoded bytes) and the scalars itself, and leaves
only the table's ``Value`` record to fastavro (a record, not a union: no whole-record
validation). It returns None for an envelope whose shape it does not know, and the encoder then
uses fastavro for everything. ``tests/unit/test_envelope.py`` checks it byte for byte against
fastavro.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import fastavro

Writer = Callable[[dict[str, Any]], bytes]

_ENVELOPE = ["before", "after", "source", "op", "ts_ms", "event_id", "origin"]
_SOURCE = ["version", "connector", "name", "ts_ms", "snapshot", "db", "schema", "table",
           "txId", "sequence"]
#: the Avro type each envelope/source field must have for this writer (else: fastavro)
_SOURCE_TYPES = ["string", "string", "string", "long", ["null", "string"], "string", "string",
                 "string", ["null", "long"], ["null", "string"]]


def _long(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _string(s: str) -> bytes:
    b = s.encode()
    return _long(len(b)) + b


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
    head = b"".join(_string(constants[k]) for k in ("version", "connector", "name"))
    middle = b"".join(_string(constants[k]) for k in ("db", "schema", "table"))
    write_record = fastavro.schemaless_writer

    def value_bytes(buf: io.BytesIO, value: Any) -> None:
        if value is None:
            buf.write(b"\x00")
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
