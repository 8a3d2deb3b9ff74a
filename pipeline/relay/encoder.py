"""Outbox rows → Kafka records (topic, key bytes, value bytes, headers).

Schemas come from the capture spec version stored with each row, so a column added by
``dx capture install`` is picked up by a running relay: the new version's schema is checked for
compatibility and registered the first time a row of that version appears.
"""

from __future__ import annotations

import datetime
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple

from pipeline.capture.spec import ColumnSpec, TableSpec, avro_name
from pipeline.errors import OutboxRowError
from pipeline.events import avro
from pipeline.events.wire import RegisteredSchema, SchemaRegistrar
from pipeline.relay.envelope import Writer, _bytes, field_writers, record_writer
from pipeline.relay.reader import OutboxRow

Headers = list[tuple[str, str | bytes | None]]
EVENT_ID_NAMESPACE = uuid.UUID("6d1c5f0e-3b7a-4f58-9f0a-64782d72656c")
DX_VERSION = "0.1.0"


class Record(NamedTuple):
    """One Kafka record (a tuple: one or two per event)."""

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
    #: the row's columns written one by one (see :func:`_row_writer`), with the fast writer
    write_rows: RowsWriter | None = None
    #: the source record around its per-row ``sequence``: (writer of the fields before it,
    #: of ``sequence``, of the fields after it)
    write_source: tuple[Writer, Writer, Writer] | None = None


Row = dict[str, Any]
#: (before, after) -> their Avro bytes (None stays None)
RowsWriter = Callable[[Row | None, Row | None], tuple[bytes | None, bytes | None]]
#: one column's value -> its Avro bytes in the row record (union branch included)
ColumnWriter = Callable[[Any], bytes]
_SAME_TYPES = (str, int, bool)


def _row_writer(columns: list[tuple[str, ColumnWriter]],
                convert: Callable[[Row], Row]) -> RowsWriter:
    """Converts and writes a row column by column, without the converted dict. Each column
    remembers its last value and bytes: an update's ``before`` (written after its ``after``)
    reuses every unchanged column, and so does a run of rows sharing a value (a bulk update's
    timestamp). Only exact repeats count: same type and equal (jsonb's ``1`` and ``1.0``
    compare equal but are written differently; floats and Decimals are not reused). A value
    that cannot be converted raises what ``convert`` raises (the column named)."""
    env: dict[str, Any] = {"last_values": [object()] * len(columns),
                           "last_bytes": [b""] * len(columns), "same": _SAME_TYPES,
                           "convert": convert}
    # generated like the envelope writer (pipeline.relay.envelope): one inline step per column
    lines = ["def write(row):", "    get = row.get", "    try:"]
    for i, (name, w) in enumerate(columns):
        env[f"w{i}"] = w
        lines += [f"        v = get({name!r})",
                  f"        lv = last_values[{i}]",
                  "        if v is lv or (v.__class__ is lv.__class__ and v.__class__ in same "
                  "and v == lv):",
                  f"            b{i} = last_bytes[{i}]",
                  "        else:",
                  f"            b{i} = last_bytes[{i}] = w{i}(v)",
                  f"            last_values[{i}] = v"]
    lines += ["    except (ValueError, TypeError, ArithmeticError):",
              "        convert(row)  # the error naming the column, when conversion failed",
              "        raise",
              f"    return b''.join(({''.join(f'b{i}, ' for i in range(len(columns)))}))"]
    if not columns:
        lines = ["def write(row):", "    return b''"]
    exec(compile("\n".join(lines), "<dx row writer>", "exec"), env)  # noqa: S102
    write: Callable[[Row], bytes] = env["write"]

    def rows(before: Row | None, after: Row | None) -> tuple[bytes | None, bytes | None]:
        data = None if after is None else write(after)
        return (None if before is None else write(before)), data

    return rows


def _column_writer(col: ColumnSpec, field_type: Any, write: Writer) -> ColumnWriter:
    conv = avro.column_converter(col)
    if conv is None:
        return write

    def slow(v: Any) -> bytes:
        return write(v if v is None else conv(v))

    decimal = field_type[1] if isinstance(field_type, list) and len(field_type) == 2 else None
    if col.type == "numeric" and not col.is_array and isinstance(decimal, dict) and \
            decimal.get("logicalType") == "decimal" and decimal.get("type") == "bytes" and \
            decimal.get("scale") == col.scale and isinstance(decimal.get("precision"), int):
        return _decimal_writer(decimal["precision"], int(col.scale or 0), slow)
    return slow


_NUMERIC_TEXT = re.compile(r"(-?)(\d+)(?:\.(\d+))?")


def _decimal_writer(precision: int, scale: int, slow: ColumnWriter) -> ColumnWriter:
    """numeric(p, s) as PostgreSQL writes it (text from logical capture, an exact Decimal from
    trigger capture's jsonb) straight to Avro decimal bytes: the unscaled integer from the
    digits, as fastavro writes the quantized Decimal. Anything else (more fraction digits
    than the scale, NaN, an exponent, more digits than the precision) takes the converter and
    fastavro's way, errors included."""
    fullmatch = _NUMERIC_TEXT.fullmatch

    def write(v: Any) -> bytes:
        text = str(v) if v.__class__ is Decimal else v  # exact (jsonb's numbers, trigger mode)
        if text.__class__ is str and (m := fullmatch(text)) is not None:
            sign, whole, frac = m.groups()
            frac = frac or ""
            if len(frac) <= scale:
                unscaled = int(whole + frac + "0" * (scale - len(frac)))
                if len(str(unscaled)) <= precision:  # the digits Decimal counts
                    n = (unscaled.bit_length() + 8) // 8
                    data = (-unscaled if sign else unscaled).to_bytes(n, "big", signed=True)
                    return b"\x02" + _bytes(data)
        return slow(v)

    return write


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _micros(at: datetime.datetime) -> int:
    return (at - _EPOCH) // datetime.timedelta(microseconds=1)


def _columns_writer(schema: dict[str, Any], spec: TableSpec) -> RowsWriter | None:
    """The row writer of the envelope's ``after`` record (the table's columns, in order), or
    None when its shape is not the one :func:`avro.value_schema` makes."""
    before = next((f["type"] for f in schema["fields"] if f["name"] == "before"), None)
    record = before[1] if isinstance(before, list) and len(before) == 2 else None
    writers = field_writers(record)
    if writers is None or not isinstance(record, dict) or \
            [f["name"] for f in record["fields"]] != [avro_name(c.name)
                                                      for c in spec.columns]:
        return None
    columns = [(c.name, _column_writer(c, f["type"], w))
               for c, f, w in zip(spec.columns, record["fields"], writers, strict=True)]
    return _row_writer(columns, avro.row_converter(spec.columns))


def _source_writer(schema: dict[str, Any]) -> tuple[Writer, Writer, Writer] | None:
    """Writers of the source record's fields before ``sequence``, of ``sequence`` and after it
    (a record's bytes are its fields' in order)."""
    source = next((f["type"] for f in schema["fields"] if f["name"] == "source"), None)
    if not isinstance(source, dict):
        return None
    fields = source.get("fields", [])
    at = next((i for i, f in enumerate(fields) if f["name"] == "sequence"), None)
    if at is None:
        return None
    part = {"type": "record", "namespace": source.get("namespace")}
    head = record_writer({**part, "name": "SourceHead", "fields": fields[:at]})
    tail = record_writer({**part, "name": "SourceTail", "fields": fields[at + 1:]})
    seq = field_writers({**part, "name": "SourceSequence", "fields": [fields[at]]})
    if head is None or tail is None or not seq:
        return None
    return head, seq[0], tail


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
        self._source_key: tuple[Any, ...] | None = None
        self._source_parts = (b"", b"")

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
            fast = writer is not None
            hit = _Entity(
                spec=spec,
                key=self.registrar.get(f"{spec.topic}-key", key_schema),
                value=self.registrar.get(f"{spec.topic}-value", schema),
                convert=avro.row_converter(spec.columns),
                convert_key=avro.row_converter(spec.key_columns),
                write_value=writer,
                write_key=record_writer(key_schema),
                write_rows=_columns_writer(schema, spec) if fast else None,
                write_source=_source_writer(schema) if fast else None,
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
        before: Row | bytes | None
        after: Row | bytes | None
        if ent.write_rows is not None:
            before, after = ent.write_rows(row.before, row.after)
        else:
            before = ent.convert(row.before) if row.before is not None else None
            after = ent.convert(row.after) if row.after is not None else None
        now = time.time_ns()  # one reading: ts_ms and ts_us agree
        value = {
            "before": before,
            "after": after,
            "source": self._source(ent, row),
            "op": row.op,
            "ts_ms": now // 1_000_000,
            "ts_us": now // 1000,
            "event_id": event_id,
            "origin": row.origin,
        }
        data = ent.value.header + ent.write_value(value) if ent.write_value is not None \
            else ent.value.encode(value)
        records = [Record(spec.topic, key, data, headers, row)]
        if row.op == "d":
            records.append(Record(spec.topic, key, None, headers, row))  # tombstone
        return records

    def _source(self, ent: _Entity, row: OutboxRow) -> dict[str, Any] | bytes:
        """The source record; with the fast writer its bytes, the parts a transaction's rows
        share written once per transaction."""
        if ent.write_source is None:
            return self._source_dict(ent.spec, row)
        head, seq, tail = ent.write_source
        key = (ent, row.op == "r", row.xid, row.committed_at)
        if self._source_key != key:
            src = self._source_dict(ent.spec, row)
            self._source_key, self._source_parts = key, (head(src), tail(src))
        return self._source_parts[0] + seq(f"{row.seq}:{row.id}") + self._source_parts[1]

    def _source_dict(self, spec: TableSpec, row: OutboxRow) -> dict[str, Any]:
        return {
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
        }

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
