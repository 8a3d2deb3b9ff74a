"""Avro schemas generated from table specs: valid, Debezium-shaped, evolvable."""

from __future__ import annotations

import datetime as dt
import io
from decimal import Decimal

import fastavro

from pipeline.capture.spec import ColumnSpec, TableSpec
from pipeline.events import avro

SPEC = TableSpec(
    entity="public.products", schema="public", table="products", topic="shop.public.products",
    key=("id",),
    columns=(
        ColumnSpec("id", "int4", nullable=False),
        ColumnSpec("price", "numeric", nullable=True, precision=10, scale=2),
        ColumnSpec("tags", "text", nullable=True, is_array=True),
        ColumnSpec("meta", "jsonb", nullable=True),
        ColumnSpec("updated_at", "timestamptz", nullable=False),
        ColumnSpec("day", "date", nullable=True),
        ColumnSpec("blob", "bytea", nullable=True),
        ColumnSpec("weird", "tsvector", nullable=True),
    ),
)


def roundtrip(schema: dict, value: dict) -> dict:
    parsed = fastavro.parse_schema(schema)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, value)
    buf.seek(0)
    return fastavro.schemaless_reader(buf, parsed)  # type: ignore[return-value]


def test_envelope_is_debezium_shaped_and_roundtrips() -> None:
    schema = avro.value_schema(SPEC, "shop")
    assert [f["name"] for f in schema["fields"]] == [
        "before", "after", "source", "op", "ts_ms", "ts_us", "event_id", "origin"]
    assert schema["namespace"] == "shop.public.products"
    convert = avro.row_converter(SPEC.columns)
    row = convert({"id": 1, "price": Decimal("1.5"), "tags": ["a", None],
                   "meta": {"k": [1, 2]}, "updated_at": "2026-01-02T03:04:05.123456+00:00",
                   "day": "2026-01-02", "blob": "\\x00ff", "weird": "'a' 'b'"})
    value = {"before": None, "after": row, "op": "c", "ts_ms": 1, "origin": None,
             "event_id": "6d1c5f0e-3b7a-4f58-9f0a-64782d72656c",
             "source": {"version": "x", "connector": "dx", "name": "shop", "ts_ms": 1,
                        "snapshot": "false", "db": "d", "schema": "public",
                        "table": "products", "txId": 5, "sequence": "1:1"}}
    back = roundtrip(schema, value)
    after = back["after"]
    assert after["price"] == Decimal("1.50")
    assert after["tags"] == ["a", None]
    assert after["meta"] == '{"k":[1,2]}'
    assert after["updated_at"] == "2026-01-02T03:04:05.123456Z"  # Debezium's ZonedTimestamp
    assert after["day"] == dt.date(2026, 1, 2)
    assert after["blob"] == b"\x00\xff"
    assert after["weird"] == "'a' 'b'"


def test_key_schema_has_only_key_columns() -> None:
    key = avro.key_schema(SPEC, "shop")
    assert key["name"] == "Key" and [f["name"] for f in key["fields"]] == ["id"]
    assert key["fields"][0]["type"] == "int"


def test_added_column_is_backward_compatible() -> None:
    """A reader with the new schema (one more column) reads data written with the old one."""
    old = avro.value_schema(TableSpec(**{**SPEC.__dict__, "columns": SPEC.columns[:2]}), "shop")
    new = avro.value_schema(SPEC, "shop")
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(old), {
        "before": None, "after": {"id": 1, "price": Decimal("2.00")}, "op": "c", "ts_ms": None,
        "event_id": "6d1c5f0e-3b7a-4f58-9f0a-64782d72656c", "origin": None,
        "source": {"version": "x", "connector": "dx", "name": "s", "ts_ms": 0, "db": "d",
                   "schema": "public", "table": "products"}})
    buf.seek(0)
    back = fastavro.schemaless_reader(buf, fastavro.parse_schema(old), fastavro.parse_schema(new))
    assert back["after"]["tags"] is None  # type: ignore[index]


DEBEZIUM_SPEC = TableSpec(
    entity="public.all", schema="public", table="all", topic="shop.public.all", key=("id",),
    columns=(
        ColumnSpec("id", "int2", nullable=False),
        ColumnSpec("n1", "numeric", nullable=True),
        ColumnSpec("n2", "numeric", nullable=True, is_array=True),
        ColumnSpec("tz", "timestamptz", nullable=True),
        ColumnSpec("tt", "timetz", nullable=True),
        ColumnSpec("iv", "interval", nullable=True),
        ColumnSpec("ts", "timestamp", nullable=True),
        ColumnSpec("t", "time", nullable=True),
        ColumnSpec("u", "uuid", nullable=True),
        ColumnSpec("mood", "mood", nullable=True, category="E"),
    ),
)


def _field_type(schema: dict, name: str) -> dict:
    value = schema["fields"][0]["type"][1]
    return next(f["type"][1] for f in value["fields"] if f["name"] == name)


def test_columns_carry_debezium_semantic_names() -> None:
    schema = avro.value_schema(DEBEZIUM_SPEC, "shop")
    names = {c.name: _field_type(schema, c.name) for c in DEBEZIUM_SPEC.columns}
    assert names["id"]["connect.type"] == "int16"
    assert names["n1"]["connect.name"] == "io.debezium.data.VariableScaleDecimal"
    assert names["n2"]["items"] == ["null", "io.debezium.data.VariableScaleDecimal"]  # defined once
    assert names["tz"] == {"type": "string", "connect.version": 1,
                           "connect.name": "io.debezium.time.ZonedTimestamp"}
    assert names["tt"]["connect.name"] == "io.debezium.time.ZonedTime"
    assert names["iv"]["connect.name"] == "io.debezium.time.MicroDuration"
    assert names["ts"]["connect.name"] == "io.debezium.time.MicroTimestamp"
    assert names["t"]["connect.name"] == "io.debezium.time.MicroTime"
    assert names["u"]["connect.name"] == "io.debezium.data.Uuid"
    assert names["mood"]["connect.name"] == "io.debezium.data.Enum"
    fastavro.parse_schema(schema)


def test_debezium_representations_roundtrip_to_python_values() -> None:
    schema = avro.value_schema(DEBEZIUM_SPEC, "shop")
    row = avro.row_converter(DEBEZIUM_SPEC.columns)({
        "id": 1, "n1": Decimal("-12345678901234567890.000123"), "n2": [1, None, Decimal("0.5")],
        "tz": "2026-01-02T05:04:05.5+02:00", "tt": "04:05:06.789+02",
        "iv": "1 year 2 mons -3 days -04:05:06.5", "ts": "2026-01-02T03:04:05",
        "t": "23:59:59.999999", "u": "6d1c5f0e-3b7a-4f58-9f0a-64782d72656c", "mood": "ok"})
    assert row["tz"] == "2026-01-02T03:04:05.5Z"
    assert row["tt"] == "04:05:06.789+02:00"
    assert row["iv"] == ((14 * 30 - 3) * 86_400 - 4 * 3600 - 5 * 60 - 6.5) * 1_000_000
    assert row["n1"]["scale"] == 6
    value = {"before": None, "after": row, "op": "c", "ts_ms": 1, "origin": None,
             "event_id": "6d1c5f0e-3b7a-4f58-9f0a-64782d72656c",
             "source": {"version": "x", "connector": "dx", "name": "shop", "ts_ms": 1,
                        "db": "d", "schema": "public", "table": "all", "lsn": 42}}
    to_python = avro.python_values(schema)
    assert to_python is not None
    after = to_python(roundtrip(schema, value))["after"]
    assert after["n1"] == Decimal("-12345678901234567890.000123")
    assert after["n2"] == [Decimal(1), None, Decimal("0.5")]
    assert after["tz"] == dt.datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=dt.UTC)
    assert after["iv"] == dt.timedelta(days=14 * 30 - 3, hours=-4, minutes=-5, seconds=-6.5)
    assert after["ts"] == dt.datetime(2026, 1, 2, 3, 4, 5)
    assert after["mood"] == "ok"


def test_numeric_nan_is_refused_not_dropped() -> None:
    import pytest

    convert = avro.row_converter(DEBEZIUM_SPEC.columns)
    with pytest.raises(ValueError, match="column n1"):
        convert({"id": 1, "n1": "NaN"})


def test_interval_in_another_style_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="IntervalStyle"):
        avro.micro_duration("P1Y2M")


def test_semantic_names_on_existing_types_are_backward_compatible() -> None:
    """Names added to a type that keeps its Avro type: a reader with the new schema reads
    events written with the old one (what the registry's BACKWARD rule checks)."""
    old_type = {"type": "long", "logicalType": "local-timestamp-micros"}
    new_type = avro.avro_type(ColumnSpec("ts", "timestamp", nullable=True))
    old = {"type": "record", "name": "V", "fields": [{"name": "ts", "type": old_type}]}
    new = {"type": "record", "name": "V", "fields": [{"name": "ts", "type": new_type}]}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(old), {"ts": dt.datetime(2026, 1, 1)})
    buf.seek(0)
    back = fastavro.schemaless_reader(buf, fastavro.parse_schema(old), fastavro.parse_schema(new))
    assert back == {"ts": dt.datetime(2026, 1, 1)}


def test_committed_contracts_parse_and_match_the_code() -> None:
    """The reviewed files in avro_schemas/ are valid Avro, and the shared shapes are the ones
    the relay writes (the per-table files are checked against a live catalog and the relay by
    tests/integration/test_committed_contracts.py)."""
    import json
    from pathlib import Path

    from pipeline.events.contracts import render

    contracts = Path(__file__).resolve().parents[2] / "avro_schemas"
    files = sorted(contracts.glob("*.avsc"))
    assert len(files) >= 4
    for path in files:
        fastavro.parse_schema(json.loads(path.read_text()))
    assert (contracts / "dx.Source.avsc").read_text() == render(avro.SOURCE_SCHEMA)
    assert (contracts / "dx.OutboxEvent.avsc").read_text() == render(avro.OUTBOX_EVENT_SCHEMA)
