"""Outbox rows → Kafka records (topic, key bytes, value bytes, headers).

Schemas come from the capture spec version stored with each row, so a column added by
``dx capture install`` is picked up by a running relay: the new version's schema is checked for
compatibility and registered the first time a row of that version appears.
"""

from __future__ import annotations

import datetime
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.capture.spec import TableSpec
from pipeline.errors import OutboxRowError
from pipeline.events import avro
from pipeline.events.wire import RegisteredSchema, SchemaRegistrar
from pipeline.relay.envelope import Writer, record_writer
from pipeline.relay.reader import OutboxRow

Headers = list[tuple[str, str | bytes | None]]
EVENT_ID_NAMESPACE = uuid.UUID("6d1c5f0e-3b7a-4f58-9f0a-64782d72656c")
DX_VERSION = "0.1.0"


@dataclass(frozen=True)
class Record:
    topic: str
    key: bytes
    value: bytes | None
    headers: Headers
    row: OutboxRow


@dataclass
class _Entity:
    spec: TableSpec
    key: RegisteredSchema
    value: RegisteredSchema
    convert: Callable[[dict[str, Any]], dict[str, Any]]
    convert_key: Callable[[dict[str, Any]], dict[str, Any]]
    write_value: Writer | None = None  # the fast envelope writer, when the shape is known
    write_key: Writer | None = None  # likewise for the key


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _micros(at: datetime.datetime) -> int:
    return (at - _EPOCH) // datetime.timedelta(microseconds=1)


class Encoder:
    def __init__(self, registrar: SchemaRegistrar, *, prefix: str, db: str, system_id: int,
                 outbox_topic_template: str,
                 load_spec: Callable[[str, int], TableSpec]) -> None:
        self.registrar = registrar
        self.prefix = prefix
        self.db = db
        self.system_id = system_id
        self.outbox_topic_template = outbox_topic_template
        self.load_spec = load_spec
        self._entities: dict[tuple[str, int], _Entity] = {}

    def event_id(self, row: OutboxRow) -> str:
        if row.event_id is not None:
            return str(row.event_id)
        return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{self.system_id}:{row.xid}:{row.id}"))

    def _entity(self, entity: str, version: int) -> _Entity:
        hit = self._entities.get((entity, version))
        if hit is None:
            spec = self.load_spec(entity, version)
            schema = avro.value_schema(spec, self.prefix)
            key_schema = avro.key_schema(spec, self.prefix)
            writer = record_writer(schema)
            hit = _Entity(
                spec=spec,
                key=self.registrar.get(f"{spec.topic}-key", key_schema),
                value=self.registrar.get(f"{spec.topic}-value", schema),
                convert=avro.row_converter(spec.columns),
                convert_key=avro.row_converter(spec.key_columns),
                write_value=writer,
                write_key=record_writer(key_schema),
            )
            self._entities[(entity, version)] = hit
        return hit

    def encode(self, row: OutboxRow) -> list[Record]:
        """The Kafka records of one outbox row; OutboxRowError names the row when its values
        cannot be encoded (the relay stops there rather than skip it)."""
        try:
            return self._encode(row)
        except (ValueError, TypeError, ArithmeticError, OverflowError) as err:
            raise OutboxRowError(str(err), entity=row.entity, seq=row.seq, id=row.id,
                                 key=json.dumps(row.key, default=str)) from None

    def _encode(self, row: OutboxRow) -> list[Record]:
        event_id = self.event_id(row)
        headers: Headers = [("dx.event_id", event_id.encode())]
        if row.origin is not None:
            headers.append(("dx.origin", row.origin.encode()))
        if row.op == "e":
            return [self._encode_app_event(row, event_id, headers)]
        ent = self._entity(row.entity, row.version)
        spec = ent.spec
        key = ent.key.header + ent.write_key(ent.convert_key(row.key)) \
            if ent.write_key is not None else ent.key.encode(ent.convert_key(row.key))
        value = {
            "before": ent.convert(row.before) if row.before is not None else None,
            "after": ent.convert(row.after) if row.after is not None else None,
            "source": {
                "version": DX_VERSION,
                "connector": "dx",
                "name": self.prefix,
                "ts_ms": int(row.committed_at.timestamp() * 1000),
                "snapshot": "true" if row.op == "r" else "false",
                "db": self.db,
                "schema": spec.schema,
                "table": spec.table,
                "txId": row.xid,
                "sequence": f"{row.seq}:{row.id}",
                "ts_us": _micros(row.committed_at),
                "lsn": getattr(row, "lsn", None),
            },
            "op": row.op,
            "ts_ms": int(time.time() * 1000),
            "ts_us": time.time_ns() // 1000,
            "event_id": event_id,
            "origin": row.origin,
        }
        data = ent.value.header + ent.write_value(value) if ent.write_value is not None \
            else ent.value.encode(value)
        records = [Record(spec.topic, key, data, headers, row)]
        if row.op == "d":
            records.append(Record(spec.topic, key, None, headers, row))  # tombstone
        return records

    def _encode_app_event(self, row: OutboxRow, event_id: str, headers: Headers) -> Record:
        topic = self.outbox_topic_template.format(prefix=self.prefix, aggregatetype=row.entity)
        key_schema = self.registrar.get(f"{topic}-key", avro.OUTBOX_KEY_SCHEMA)
        value_schema = self.registrar.get(f"{topic}-value", avro.OUTBOX_EVENT_SCHEMA)
        value = {
            "event_id": event_id,
            "aggregatetype": row.entity,
            "aggregateid": str(row.key),
            "type": row.event_type or "",
            "payload": None if row.after is None else json.dumps(row.after, default=str),
            "ts_ms": int(row.committed_at.timestamp() * 1000),
            "origin": row.origin,
        }
        return Record(topic, key_schema.encode(str(row.key)), value_schema.encode(value),
                      [*headers, ("dx.event_type", (row.event_type or "").encode())], row)
