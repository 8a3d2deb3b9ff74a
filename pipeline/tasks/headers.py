"""The one codec for Kafka headers kept in ``dx.task.raw_headers`` (sink and source tasks).

A header is stored as ``[name, text]`` when its value is UTF-8 text PostgreSQL can hold,
``[name, base64, "base64"]`` when it is not (binary, or with a NUL), and ``[name, null]`` for a
header without a value. Rows written before this codec by source workers (a binary value as the
text ``base64:<data>``, a null as ``""``) cannot be told from text headers and read back as text.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from typing import Any

Header = tuple[str, bytes | None]


def encode_header(name: str, value: bytes | str | None) -> list[str | None]:
    """A header as the task store keeps it."""
    if value is None:
        return [name, None]
    raw = value.encode() if isinstance(value, str) else value
    try:
        text = raw.decode("utf-8")
        if "\x00" not in text:
            return [name, text]
    except UnicodeDecodeError:
        pass
    return [name, base64.b64encode(raw).decode(), "base64"]


def decode_header(row: Sequence[Any]) -> Header:
    """The header from its stored form (any form this codec or its predecessors wrote)."""
    name = str(row[0])
    value = row[1] if len(row) > 1 else None
    if value is None:
        return name, None
    marker = row[2] if len(row) > 2 else None
    if marker == "base64":
        return name, base64.b64decode(str(value))
    return name, str(value).encode()


def encode_headers(headers: Iterable[tuple[str, bytes | str | None]]) -> list[list[str | None]]:
    return [encode_header(k, v) for k, v in headers]


def decode_headers(rows: Iterable[Sequence[Any]] | None) -> list[Header]:
    return [decode_header(r) for r in rows or ()]
