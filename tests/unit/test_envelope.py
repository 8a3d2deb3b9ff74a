"""The generated writer encodes exactly what fastavro encodes, byte for byte: for today's
envelope (whatever :mod:`pipeline.events.avro` maps types to) and for hand-made schemas with
every construct it generates."""

from __future__ import annotations

import datetime as dt
import io
from decimal import Decimal
from typing import Any

import fastavro
import pytest

from pipeline.capture.spec import ColumnSpec, TableSpec
from pipeline.events import avro
from pipeline.relay.envelope import record_writer

SPEC = TableSpec(
    entity="public.products", schema="public", table="products", topic="shop.public.products",
    key=("id",),
    columns=(
        ColumnSpec("id", "int8", nullable=False),
        ColumnSpec("price", "numeric", nullable=True, precision=10, scale=2),
        ColumnSpec("amount", "numeric", nullable=True),
        ColumnSpec("tags", "text", nullable=True, is_array=True),
        ColumnSpec("meta", "jsonb", nullable=True),
        ColumnSpec("at", "timestamptz", nullable=False),
        ColumnSpec("blob", "bytea", nullable=True),
        ColumnSpec("ok", "bool", nullable=True),
        ColumnSpec("ratio", "float8", nullable=True),
        ColumnSpec("small", "float4", nullable=True),
        ColumnSpec("uid", "uuid", nullable=True),
        ColumnSpec("day", "date", nullable=True),
        ColumnSpec("clock", "time", nullable=True),
        ColumnSpec("local", "timestamp", nullable=True),
        ColumnSpec("nums", "int4", nullable=True, is_array=True),
        ColumnSpec("feel", "mood", nullable=True, category="E"),
    ),
)
CONSTANTS = {"version": "0.1.0", "connector": "dx", "name": "shop", "db": "sh\u00f6p",
             "schema": "public", "table": "products"}
# captured values as trigger and logical capture hand them to the converters (jsonb forms)
ROW = {"id": -(2 ** 62), "price": Decimal("12.50"), "amount": "3.14", "tags": ["a", None],
       "meta": {"a": 1}, "at": "2024-02-29T01:02:03.000004+00:00", "blob": "\\x00ff",
       "ok": False, "ratio": 0.1, "small": 1.5, "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
       "day": "1969-12-31", "clock": "23:59:59.999999", "local": "2024-02-29T01:02:03",
       "nums": [1, None, -300], "feel": "busy"}
NULLS = dict.fromkeys(ROW) | {"id": 0, "at": "1970-01-01T00:00:00+00:00"}


CONVERT = avro.row_converter(SPEC.columns)


def envelope(before: Any, after: Any, **over: Any) -> dict[str, Any]:
    """An envelope value with every field the schema has (converted rows; extra top-level and
    source fields the schema may carry get values too)."""
    schema = avro.value_schema(SPEC, "shop")
    source_fields = next(f for f in schema["fields"] if f["name"] == "source")["type"]["fields"]
    value: dict[str, Any] = {f["name"]: 7 for f in schema["fields"]}
    value["source"] = {f["name"]: 7 for f in source_fields}
    value |= {
        "before": None if before is None else CONVERT(before),
        "after": None if after is None else CONVERT(after),
        "op": "u", "ts_ms": 1_700_000_000_456,
        "event_id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "origin": "erp \u2603",
    }
    value["source"] |= {**CONSTANTS, "ts_ms": 1_700_000_000_123, "snapshot": "false",
                        "txId": 2 ** 40, "sequence": "123:4"}
    return value | over


@pytest.mark.parametrize("value", [
    envelope(ROW, ROW),
    envelope(None, ROW, op="c", origin=None),
    envelope(NULLS, None, op="d", ts_ms=None),
    envelope(ROW, NULLS, source={**envelope(None, None)["source"], "snapshot": None,
                                 "txId": None, "sequence": None, "ts_ms": -1}),
])
def test_byte_for_byte_with_fastavro(value: dict[str, Any]) -> None:
    schema = avro.value_schema(SPEC, "shop")
    write = record_writer(schema)
    assert write is not None  # no fastavro fallback for today's envelope
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), value)
    assert write(value) == buf.getvalue()


def test_what_it_does_not_generate_falls_back_to_fastavro() -> None:
    schema = avro.value_schema(SPEC, "shop")
    for odd in ({"type": "map", "values": "int"}, ["int", "string"],
                {"type": "enum", "name": "E", "symbols": ["a"]}):
        assert record_writer({**schema, "fields": [*schema["fields"],
                                                   {"name": "extra", "type": odd}]}) is None


def test_nested_and_named_records_byte_for_byte() -> None:
    schema = {"type": "record", "name": "Outer", "namespace": "n", "fields": [
        {"name": "a", "type": ["null", {"type": "record", "name": "Inner", "fields": [
            {"name": "x", "type": "int"}, {"name": "tags", "type": {
                "type": "array", "items": "string"}}]}]},
        {"name": "b", "type": ["null", "n.Inner"]},
        {"name": "c", "type": "Inner"},
        {"name": "d", "type": {"type": "long", "logicalType": "timestamp-micros"}}]}
    write = record_writer(schema)
    assert write is not None
    inner = {"x": -3, "tags": ["p", "q\u00e9"]}
    for value in ({"a": inner, "b": None, "c": inner, "d": dt.datetime(2024, 1, 1,
                                                                       tzinfo=dt.UTC)},
                  {"a": None, "b": inner, "c": {"x": 0, "tags": []}, "d": 0}):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), value)
        assert write(value) == buf.getvalue()


@pytest.mark.parametrize("price", [Decimal("123456789012.5"), Decimal("1.234")])
def test_values_fastavro_refuses_are_refused(price: Decimal) -> None:
    schema = avro.value_schema(SPEC, "shop")
    write = record_writer(schema)
    assert write is not None
    value = envelope(None, ROW)
    value["after"]["price"] = price
    with pytest.raises(ValueError):
        fastavro.schemaless_writer(io.BytesIO(), fastavro.parse_schema(schema), value)
    with pytest.raises(ValueError):
        write(value)


def test_fast_uuid5_is_uuid5() -> None:
    import uuid

    from pipeline.relay.envelope import uuid5_text

    ns = uuid.uuid4()
    for name in ("", "1:2", "\u2603" * 40):
        assert uuid5_text(ns.bytes, name) == str(uuid.uuid5(ns, name))


def test_key_writer_byte_for_byte() -> None:
    spec = TableSpec(entity="s.t", schema="s", table="t", topic="x", key=("id", "region"),
                     columns=(ColumnSpec("id", "int8", nullable=False),
                              ColumnSpec("region", "text", nullable=True)))
    schema = avro.key_schema(spec, "shop")
    write = record_writer(schema)
    assert write is not None
    for key in ({"id": 7, "region": "eu"}, {"id": -1, "region": None}):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), key)
        assert write(key) == buf.getvalue()


@pytest.mark.parametrize(("before", "after"), [
    (ROW, ROW),  # every column reused from after
    (ROW, {**ROW, "price": Decimal("12.5"), "meta": {"a": Decimal("1.0")}, "ok": True}),
    (None, ROW), (NULLS, None), (ROW, NULLS),
])
def test_parts_written_once_byte_for_byte(before: Any, after: Any) -> None:
    """The encoder's way: rows written column by column (an update's unchanged columns
    reused), the source around its per-row sequence, handed to the envelope writer as bytes."""
    from pipeline.relay.encoder import _columns_writer, _source_writer

    schema = avro.value_schema(SPEC, "shop")
    write, rows, source = record_writer(schema), _columns_writer(schema, SPEC), \
        _source_writer(schema)
    assert write is not None and rows is not None and source is not None
    value = envelope(before, after)
    head, seq, tail = source
    src = value["source"]
    fast = value | dict(zip(("before", "after"), rows(before, after), strict=True)) | {
        "source": head(src) + seq(src["sequence"]) + tail(src)}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), value)
    assert write(fast) == buf.getvalue()


def test_parts_name_the_column_that_cannot_be_converted() -> None:
    from pipeline.relay.encoder import _columns_writer

    rows = _columns_writer(avro.value_schema(SPEC, "shop"), SPEC)
    assert rows is not None
    with pytest.raises(ValueError, match="column price"):
        rows(None, {**ROW, "price": "NaN"})


@pytest.mark.parametrize("text", [
    "0", "0.00", "-0.00", "12.5", "12.50", "-12.50", "99999999.99", "-99999999.99", "127",
    "-128", "1.27", "-1.28", "0.01", "-0.01", "00012.3", "1.234", "1.235", "123456789.5",
    "NaN", "Infinity", "-Infinity", "1e3", " 1.00", "+1.00", "", "1.5e-7", "-0.0", "12.500",
])
def test_numeric_text_written_as_fastavro_writes_it(text: str) -> None:
    """numeric(10, 2) from its text form: the direct way and the converter + fastavro way
    give the same bytes, or both refuse (rounding, NaN, too many digits)."""
    from pipeline.relay.encoder import _columns_writer

    spec = TableSpec(entity="s.t", schema="s", table="t", topic="x", key=(),
                     columns=(ColumnSpec("price", "numeric", nullable=True, precision=10,
                                         scale=2),))
    schema = avro.value_schema(spec, "shop")
    rows = _columns_writer(schema, spec)
    assert rows is not None
    value = schema["fields"][0]["type"][1]
    try:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, fastavro.parse_schema(value),
                                   avro.row_converter(spec.columns)({"price": text}))
    except (ValueError, ArithmeticError):
        with pytest.raises((ValueError, ArithmeticError)):
            rows(None, {"price": text})
        return
    assert rows(None, {"price": text}) == (None, buf.getvalue())
    # the same value as trigger capture's jsonb hands it on
    assert rows(None, {"price": Decimal(text)}) == (None, buf.getvalue())
