"""Decoding inbound Kafka messages into dx's inbound events.

Producers differ: some send a flat record of the row, some a Debezium envelope (``after``,
``before``, ``op``), some Kafka Connect's JSON with ``schema``/``payload``, some delete with a
tombstone or with Debezium's ``__deleted`` marker (``ExtractNewRecordState``). All of them become
one :class:`Inbound` shape, so validation and apply have a single path.

A message that cannot be decoded is an :class:`~pipeline.source.validate.FieldError` for that
message only; a registry that cannot be reached is a :class:`ServiceUnavailable` that stops the
batch (retrying later will decode it, dead-lettering it would lose it).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka.schema_registry import SchemaRegistryClient

from pipeline.db import json_loads_exact
from pipeline.events.wire import Undecodable, WireDecoder
from pipeline.source.validate import FieldError

Op = Literal["upsert", "delete"]


@dataclass(slots=True)
class Decoded:
    """A message after decoding, before validation against the table."""

    op: Op
    record: dict[str, Any] | None  # the row image (after for upserts, before for deletes)
    key: dict[str, Any] | None  # the message key as fields, when there is one
    event_id: str | None


class AvroDecoder:
    """Confluent wire format (the one wire decoder); undecodable bytes are a FieldError."""

    def __init__(self, client: SchemaRegistryClient, url: str) -> None:
        self.wire = WireDecoder(client, url)

    def __call__(self, data: bytes) -> Any:
        try:
            return self.wire.decode(data)
        except Undecodable as err:
            raise FieldError(None, str(err)) from None


def json_decode(data: bytes) -> Any:
    """JSON numbers with a fraction become ``Decimal``: a numeric column gets every digit."""
    try:
        return json_loads_exact(data)
    except (UnicodeDecodeError, ValueError) as err:
        raise FieldError(None, f"undecodable: not JSON ({err})") from None


def _unwrap_connect(value: Any) -> Any:
    """Kafka Connect JsonConverter with schemas.enable: {"schema": ..., "payload": ...}."""
    if isinstance(value, dict) and set(value) == {"schema", "payload"}:
        return value["payload"]
    return value


def _as_bool(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.lower() == "true")


def shape(value: Any, key: Any, event_id: str | None) -> Decoded:
    """Normalise a decoded value (and key) into upsert/delete with a row image."""
    key_fields: dict[str, Any] | None
    key = _unwrap_connect(key)
    if key is None:
        key_fields = None
    elif isinstance(key, dict):
        key_fields = key
    else:
        key_fields = {"": key}  # a scalar key: the caller maps it to the single key column
    value = _unwrap_connect(value)
    if value is None:
        return Decoded("delete", None, key_fields, event_id)
    if not isinstance(value, dict):
        raise FieldError(None, f"the value is a {type(value).__name__}, not a record")
    if "op" in value and ("after" in value or "before" in value):
        op = value["op"]
        eid = value.get("event_id")
        if eid is not None:
            event_id = str(eid)
        if op in ("c", "u", "r"):
            after = value.get("after")
            if not isinstance(after, dict):
                raise FieldError("after", f"envelope op={op!r} needs an 'after' record")
            return Decoded("upsert", after, key_fields, event_id)
        if op == "d":
            before = value.get("before")
            if before is not None and not isinstance(before, dict):
                raise FieldError("before", "envelope 'before' is not a record")
            return Decoded("delete", before, key_fields, event_id)
        raise FieldError("op", f"unsupported envelope op {op!r} (expected c, u, r or d)")
    if "__deleted" in value:
        record = {k: v for k, v in value.items() if k != "__deleted"}
        op_: Op = "delete" if _as_bool(value["__deleted"]) else "upsert"
        return Decoded(op_, record, key_fields, event_id)
    return Decoded("upsert", value, key_fields, event_id)


def header_event_id(headers: list[tuple[str, bytes | None]] | None) -> str | None:
    for name, v in headers or ():
        if name == "dx.event_id" and v:
            try:
                return str(uuid.UUID(v.decode()))
            except (UnicodeDecodeError, ValueError):
                return None
    return None
