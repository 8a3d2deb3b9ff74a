"""``dx import FILE``: a CSV file becomes inbound events on a source route's topic.

The importer does not write to the database itself: it validates every row with the route's own
validator (the same coercions and catalog checks the worker applies), writes rows that fail to a
reject file with their line number and reason, and produces the good ones to the route's topic.
The route's worker then applies them like any producer's events, with the same exactly-once
apply, tasks and alerts, and the same origin tag (no echo back to the system the file came from).

Events are deterministic: the Kafka key is the row's key and the event id is a UUID derived from
the route and the row's content, so importing the same file again produces the same events, and
the apply's no-op guard makes them change nothing.

CSV conventions: the first line is a header of the route's field names; an empty cell is NULL.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from pipeline import db
from pipeline.capture.spec import ColumnSpec
from pipeline.config.model import DxConfig
from pipeline.config.sources import SourceRoute
from pipeline.errors import CatalogError, ConfigError, ServiceUnavailable, TerminalError
from pipeline.events.avro import avro_type, define_once, python_converter
from pipeline.events.topics import ensure_route_topics
from pipeline.events.wire import RegisteredSchema, SchemaRegistrar, registry_client
from pipeline.observability.logging import KAFKA_LOG
from pipeline.source.catalog import Column, Target, read_target
from pipeline.source.validate import FieldError, RowValidator

_NAMESPACE = uuid.UUID("6f1d3c1e-8a57-4d1e-9c1b-5d0a2b7e4c10")
Progress = Callable[[int, int], None]  # (rows done, rows total)


@dataclass
class ImportResult:
    route: str
    topic: str
    rows: int = 0
    produced: int = 0
    rejected: int = 0
    reject_file: Path | None = None
    end_offsets: dict[int, int] = field(default_factory=dict)  # partition -> last offset + 1


def pick_route(config: DxConfig, entity: str | None, table: str | None) -> int:
    """The route an import goes through: ``--entity`` names the route, ``--table`` its target."""
    if entity is not None:
        return config.source(entity)[0]
    if table is None:
        raise ConfigError("give --entity ROUTE or --table TABLE", file=config.where()[0])
    wanted = table if "." in table else f"public.{table}"
    matches = [i for i, r in enumerate(config.sources) if r.qualified == wanted]
    if not matches:
        raise CatalogError(f"no source route writes table {wanted} (add one under 'sources:')")
    if len(matches) > 1:
        names = ", ".join(config.sources[i].name for i in matches)
        raise CatalogError(f"several source routes write {wanted} ({names}); use --entity")
    return matches[0]


def _json_default(v: Any) -> Any:
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, bytes):
        import base64

        return base64.b64encode(v).decode()
    raise TypeError(f"cannot encode {type(v).__name__}")


def _spec(col: Column) -> ColumnSpec:
    return ColumnSpec(name=col.name, type=col.type, nullable=True, is_array=col.is_array,
                      precision=col.precision, scale=col.scale, category=col.category)


class _Encoder:
    """Key and value bytes in the route's format (JSON, or Avro registered for the topic)."""

    def __init__(self, config: DxConfig, route: SourceRoute, target: Target,
                 fields: list[str], validator: RowValidator) -> None:
        self.route = route
        self.fields = fields
        self.key_fields = [validator.field(k) for k in target.key]
        self.columns = {f: target.columns[route.column_for(f)] for f in fields}
        self.value_schema: RegisteredSchema | None = None
        self.key_schema: RegisteredSchema | None = None
        if route.format == "avro":
            reg = config.schema_registry
            registrar = SchemaRegistrar(registry_client(reg), reg.url)
            ns = f"dx.import.{route.name}".replace("-", "_")
            self.value_schema = registrar.get(f"{route.topic}-value", define_once({
                "type": "record", "name": "Value", "namespace": ns,
                "fields": [{"name": f, "type": ["null", avro_type(_spec(self.columns[f]))],
                            "default": None} for f in fields]}))
            self.key_schema = registrar.get(f"{route.topic}-key", define_once({
                "type": "record", "name": "Key", "namespace": ns,
                "fields": [{"name": f, "type": avro_type(_spec(self.columns[f]))}
                           for f in self.key_fields]}))

    def _avro_value(self, f: str, v: Any) -> Any:
        if v is None:
            return None
        convert = python_converter(_spec(self.columns[f]))  # Debezium's representations
        return v if convert is None else convert(v)

    def encode(self, record: dict[str, Any]) -> tuple[bytes, bytes]:
        key = {f: record[f] for f in self.key_fields}
        if self.value_schema is not None and self.key_schema is not None:
            value = {f: self._avro_value(f, record.get(f)) for f in self.fields}
            return (self.key_schema.encode({f: self._avro_value(f, v) for f, v in key.items()}),
                    self.value_schema.encode(value))
        return (json.dumps(key, default=_json_default, separators=(",", ":")).encode(),
                json.dumps(record, default=_json_default, separators=(",", ":")).encode())


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number where the record starts, cells); the header is yielded as line 1. Bytes
    that are not UTF-8 are kept as lone surrogates (``surrogateescape``), so such a row is
    rejected alone (:func:`_undecodable`) instead of stopping the import halfway; a file that
    is not CSV stops it with the line."""
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        line = 1
        try:
            for cells in reader:
                yield line, cells
                line = reader.line_num + 1
        except csv.Error as err:
            raise TerminalError(f"{path}:{reader.line_num}: not valid CSV: {err}") from None


def _undecodable(cells: list[str]) -> str | None:
    """Why a row read with ``surrogateescape`` is not UTF-8 text, or None."""
    for cell in cells:
        for ch in cell:
            if "\udc80" <= ch <= "\udcff":
                return f"not UTF-8 text (byte 0x{ord(ch) - 0xdc00:02x}); save the file as UTF-8"
    return None


def count_rows(path: Path) -> int:
    with path.open("rb") as f:
        return max(0, sum(1 for _ in f) - 1)


def import_csv(config: DxConfig, path: Path, *, entity: str | None = None,
               table: str | None = None, reject_file: Path | None = None,
               dry_run: bool = False, progress: Progress | None = None) -> ImportResult:
    """Validate ``path`` and produce its good rows to the route's topic (see module doc)."""
    index = pick_route(config, entity, table)
    route = config.sources[index]
    url = config.database.url.get_secret_value()
    with db.connection(url, connect_timeout_s=config.database.connect_timeout_s) as conn:
        target = read_target(conn, config, index)
    validator = RowValidator(route, target, empty_is_null=True)
    if not path.is_file():
        raise TerminalError(f"{path}: no such file")
    rows = _rows(path)
    try:
        _, header = next(rows)
    except StopIteration:
        raise TerminalError(f"{path}: the file is empty (expected a header line)") from None
    if _undecodable(header):
        raise TerminalError(f"{path}:1: the header is {_undecodable(header)}")
    header = [h.strip() for h in header]
    _check_header(path, header, route, target, validator)
    total = count_rows(path)
    result = ImportResult(route=route.name, topic=route.topic)
    encoder = None if dry_run else _Encoder(config, route, target, header, validator)
    if not dry_run:
        ensure_route_topics(config.kafka, route)
    producer = None if dry_run else Producer(config.kafka.librdkafka({
        "enable.idempotence": True, "linger.ms": 50, "compression.type": "lz4",
        "queue.buffering.max.messages": 200_000}), logger=KAFKA_LOG)
    errors: list[str] = []

    def delivered(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err.str())
            return
        p, o = msg.partition(), msg.offset()
        if p is not None and o is not None and o + 1 > result.end_offsets.get(p, 0):
            result.end_offsets[p] = o + 1

    reject_path = reject_file or path.with_name(path.name + ".rejects.csv")
    rejects = None
    writer = None
    try:
        for line, cells in rows:
            if not any(c.strip() for c in cells):
                continue  # blank line
            result.rows += 1
            try:
                if len(cells) != len(header):
                    raise FieldError(None, f"has {len(cells)} cells, the header has "
                                           f"{len(header)}")
                undecodable = _undecodable(cells)
                if undecodable:
                    raise FieldError(None, undecodable)
                record_in = dict(zip(header, cells, strict=True))
                row = validator.row(record_in)
                record = {validator.field(c): v for c, v in row.items()}
            except FieldError as err:
                result.rejected += 1
                if writer is None:
                    rejects = reject_path.open("w", newline="", encoding="utf-8",
                                               errors="surrogateescape")  # bytes as they came
                    writer = csv.writer(rejects)
                    writer.writerow(["line", "field", "reason", *header])
                writer.writerow([line, err.field or "", err.reason, *cells])
                continue
            if producer is not None and encoder is not None:
                key, value = encoder.encode(record)
                event_id = uuid.uuid5(_NAMESPACE, f"{route.name}\n{value.hex()}")
                _produce(producer, route.topic, key, value, str(event_id), delivered)
                result.produced += 1
            if progress is not None and result.rows % 1000 == 0:
                progress(result.rows, total)
    finally:
        if rejects is not None:
            rejects.close()
        if producer is not None:
            left = producer.flush(60)
            if left and not errors:
                errors.append(f"{left} messages not delivered")
    if progress is not None:
        progress(result.rows, result.rows)
    if errors:
        raise ServiceUnavailable("kafka", config.kafka.bootstrap_servers,
                                 f"import to {route.topic} incomplete: {errors[0]}")
    if result.rejected:
        result.reject_file = reject_path
    elif reject_path.exists() and reject_file is None:
        reject_path.unlink()  # a stale reject file from an earlier run would mislead
    return result


def _produce(producer: Producer, topic: str, key: bytes, value: bytes, event_id: str,
             delivered: Callable[[KafkaError | None, Message], None]) -> None:
    while True:
        try:
            producer.produce(topic, key=key, value=value, on_delivery=delivered,
                             headers=[("dx.event_id", event_id.encode())])
            return
        except BufferError:
            producer.poll(0.1)
        except KafkaException as err:
            raise ServiceUnavailable("kafka", "producer", str(err)) from None
        finally:
            producer.poll(0)


def _check_header(path: Path, header: list[str], route: SourceRoute, target: Target,
                  validator: RowValidator) -> None:
    """Header problems would reject every row: fail once, up front, instead."""
    seen: set[str] = set()
    known = sorted(validator.field(c) for c in target.columns)
    for name in header:
        if name in seen:
            raise TerminalError(f"{path}:1: column {name!r} appears twice in the header")
        seen.add(name)
        if name not in known:
            raise TerminalError(f"{path}:1: column {name!r} is not a field of route "
                                f"{route.name} (fields: {', '.join(known)})")
    for column in target.key:
        if validator.field(column) not in seen:
            raise TerminalError(f"{path}:1: the header lacks key field "
                                f"{validator.field(column)!r}")


def wait_applied(conn: psycopg.Connection[Any], route: SourceRoute,
                 end_offsets: dict[int, int], timeout_s: float) -> bool:
    """Wait until the route's worker has applied everything up to ``end_offsets``."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = conn.execute(
            "SELECT partition, next_offset FROM dx.source_offsets WHERE route = %s AND topic = %s",
            (route.name, route.topic)).fetchall()
        conn.rollback()
        stored = {int(p): int(o) for p, o in rows}
        if all(stored.get(p, 0) >= o for p, o in end_offsets.items()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)
