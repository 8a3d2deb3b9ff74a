"""The ``pgoutput`` wire format (protocol version 1, text values), decoded into plain tuples.

Only what the relay needs: Begin, Commit, Relation, Insert, Update, Delete and transactional
logical Messages. Column values stay ``bytes`` here; :func:`text_parser` turns the exposed
ones into the same Python values trigger capture produces from ``jsonb`` (so both modes feed
one encoder and publish identical events): ``int`` for integers, ``bool``, parsed JSON for
json/jsonb, lists for arrays, and PostgreSQL's text form for everything else (numeric,
timestamps, dates, bytea as ``\\x..``), which the Avro converters read either way.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.db import json_loads_exact

#: a TOASTed value the update did not change (take it from the old row)
UNCHANGED = object()
PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)

_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">bQQq")
_I32 = struct.Struct(">I")
_I16 = struct.Struct(">H")
_Q = struct.Struct(">Q")
_COL = struct.Struct(">II")


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    typmod: int


@dataclass(frozen=True)
class Relation:
    relid: int
    schema: str
    name: str
    replident: str
    columns: tuple[Column, ...]


def commit_time(us: int) -> dt.datetime:
    return PG_EPOCH + dt.timedelta(microseconds=us)


def begin(buf: bytes) -> tuple[int, int, int]:
    """(final LSN = the commit record's, commit time in µs since 2000, xid)."""
    final_lsn, ts, xid = _BEGIN.unpack_from(buf, 1)
    return int(final_lsn), int(ts), int(xid)


def commit(buf: bytes) -> tuple[int, int]:
    """(commit LSN, end LSN)."""
    _, lsn, end, _ = _COMMIT.unpack_from(buf, 1)
    return lsn, end


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(0, pos)
    return buf[pos:end].decode(), end + 1


def relation(buf: bytes) -> Relation:
    relid = _I32.unpack_from(buf, 1)[0]
    schema, pos = _cstring(buf, 5)
    name, pos = _cstring(buf, pos)
    replident = chr(buf[pos])
    n = _I16.unpack_from(buf, pos + 1)[0]
    pos += 3
    cols = []
    for _ in range(n):
        col, pos = _cstring(buf, pos + 1)  # flags byte, then the name
        oid, typmod = _COL.unpack_from(buf, pos)
        pos += 8
        cols.append(Column(col, oid, typmod - (1 << 32) if typmod >= 1 << 31 else typmod))
    return Relation(relid, schema, name, replident, tuple(cols))


def tuple_data(buf: bytes, pos: int) -> tuple[list[Any], int]:
    """Column values (bytes, None or UNCHANGED) of one tuple starting at ``pos``."""
    n = _I16.unpack_from(buf, pos)[0]
    pos += 2
    out: list[Any] = []
    append = out.append
    size_at = _I32.unpack_from
    for _ in range(n):
        kind = buf[pos]
        if kind == 0x74:  # 't' text
            start = pos + 5
            pos = start + size_at(buf, pos + 1)[0]
            append(buf[start:pos])
        elif kind == 0x6E:  # 'n' null
            append(None)
            pos += 1
        elif kind == 0x75:  # 'u' unchanged TOASTed value
            append(UNCHANGED)
            pos += 1
        else:
            raise ValueError(f"pgoutput: unexpected tuple value kind {chr(kind)!r}")
    return out, pos


def change(buf: bytes) -> tuple[int, list[Any] | None, list[Any] | None]:
    """(relid, old values or None, new values or None) of an Insert, Update or Delete."""
    kind = buf[0]
    relid = _I32.unpack_from(buf, 1)[0]
    if kind == 0x49:  # 'I'
        new, _ = tuple_data(buf, 6)
        return relid, None, new
    if kind == 0x44:  # 'D': 'K' or 'O' then the old tuple
        gone, _ = tuple_data(buf, 6)
        return relid, gone, None
    # 'U': optional 'K'/'O' old tuple, then 'N' new tuple
    old: list[Any] | None = None
    pos = 5
    if buf[pos] in (0x4B, 0x4F):
        old, pos = tuple_data(buf, pos + 1)
    new, _ = tuple_data(buf, pos + 1)
    return relid, old, new


def message(buf: bytes) -> tuple[bool, str, bytes]:
    """(transactional, prefix, content) of a logical message."""
    transactional = bool(buf[1] & 1)
    prefix, pos = _cstring(buf, 10)
    size = _I32.unpack_from(buf, pos)[0]
    return transactional, prefix, buf[pos + 4:pos + 4 + size]


def truncate(buf: bytes) -> list[int]:
    """Relation ids of a Truncate message."""
    n = _I32.unpack_from(buf, 1)[0]
    return [_I32.unpack_from(buf, 6 + 4 * i)[0] for i in range(n)]


def lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


# -- text values -------------------------------------------------------------------------------

Parser = Callable[[bytes], Any]


def _bool(v: bytes) -> bool:
    return v == b"t"


_text: Parser = bytes.decode  # UTF-8


_SCALARS: dict[str, Parser] = {
    "bool": _bool,
    "int2": int,
    "int4": int,
    "int8": int,
    "oid": int,
    "json": json_loads_exact,
    "jsonb": json_loads_exact,
}


def text_parser(typname: str, is_array: bool) -> Parser:
    """bytes (PostgreSQL's text output) -> the value jsonb would have carried."""
    scalar = _SCALARS.get(typname, _text)
    if not is_array:
        return scalar

    def parse(v: bytes) -> Any:
        items, _ = _array(v.decode(), v.index(b"{"))
        return _map(items, scalar)

    return parse


def _map(items: list[Any], scalar: Parser) -> list[Any]:
    return [None if x is None else _map(x, scalar) if isinstance(x, list)
            else scalar(x.encode()) for x in items]


def _array(s: str, i: int) -> tuple[list[Any], int]:
    """One ``{...}`` array literal from ``s[i]``: items are str, None or nested lists."""
    out: list[Any] = []
    i += 1
    if s[i] == "}":
        return out, i + 1
    while True:
        c = s[i]
        if c == "{":
            sub, i = _array(s, i)
            out.append(sub)
        elif c == '"':
            i += 1
            chars = []
            while s[i] != '"':
                if s[i] == "\\":
                    i += 1
                chars.append(s[i])
                i += 1
            out.append("".join(chars))
            i += 1
        else:
            j = i
            while s[j] not in ",}":
                j += 1
            item = s[i:j]
            out.append(None if item == "NULL" else item)
            i = j
        if s[i] == ",":
            i += 1
            continue
        return out, i + 1
