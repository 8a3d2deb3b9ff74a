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
        "before", "after", "source", "op", "ts_ms", "event_id", "origin"]
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
    assert after["updated_at"] == dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)
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
