"""The fast envelope writer encodes exactly what fastavro encodes, byte for byte."""

from __future__ import annotations

import datetime as dt
import io
from decimal import Decimal
from typing import Any

import fastavro
import pytest

from pipeline.capture.spec import ColumnSpec, TableSpec
from pipeline.events import avro
from pipeline.relay.envelope import envelope_writer, record_writer

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
ROW = {"id": -(2 ** 62), "price": Decimal("12.50"), "amount": "3.14", "tags": ["a", None],
       "meta": '{"a":1}', "at": dt.datetime(2024, 2, 29, 1, 2, 3, 4, tzinfo=dt.UTC),
       "blob": b"\x00\xff", "ok": False, "ratio": 0.1, "small": 1.5,
       "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "day": dt.date(1969, 12, 31),
       "clock": dt.time(23, 59, 59, 999999), "local": dt.datetime(2024, 2, 29, 1, 2, 3),
       "nums": [1, None, -300], "feel": "busy"}
NULLS = dict.fromkeys(ROW) | {"id": 0, "at": dt.datetime(1970, 1, 1, tzinfo=dt.UTC)}


def envelope(before: Any, after: Any, **over: Any) -> dict[str, Any]:
    value = {
        "before": before, "after": after,
        "source": {**{k: CONSTANTS[k] for k in ("version", "connector", "name", "db",
                                                "schema", "table")},
                   "ts_ms": 1_700_000_000_123, "snapshot": "false", "txId": 2 ** 40,
                   "sequence": "123:4"},
        "op": "u", "ts_ms": 1_700_000_000_456,
        "event_id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "origin": "erp \u2603",
    }
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
    write = envelope_writer(schema, CONSTANTS)
    assert write is not None
    assert record_writer(schema["fields"][0]["type"][1]) is not None  # no fastavro fallback
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), value)
    assert write(value) == buf.getvalue()


def test_an_unknown_shape_falls_back_to_fastavro() -> None:
    schema = avro.value_schema(SPEC, "shop")
    changed = {**schema, "fields": [*schema["fields"], {"name": "extra", "type": "int"}]}
    assert envelope_writer(changed, CONSTANTS) is None
    assert envelope_writer(schema, {**CONSTANTS, "other": "x"}) is None


@pytest.mark.parametrize("price", [Decimal("123456789012.5"), Decimal("1.234")])
def test_values_fastavro_refuses_are_refused(price: Decimal) -> None:
    schema = avro.value_schema(SPEC, "shop")
    write = envelope_writer(schema, CONSTANTS)
    assert write is not None
    value = envelope(None, {**ROW, "price": price})
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
