"""Filter and mapping semantics of a route, applied to decoded Debezium envelopes."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from pipeline.config.loader import parse_config
from pipeline.sink.mapping import Event, MappingError, RouteLogic, convert, jsonable

HEAD = """database: {url: postgresql://x}
kafka: {bootstrap_servers: x}
schema_registry: {url: http://x}
sinks:
  - name: r
    topics: [t]
    target: erp
    connector: {type: http, url: 'http://x'}
"""


def logic(body: str = "") -> RouteLogic:
    return RouteLogic(parse_config(HEAD + body).sinks[0])


def ev(op: str = "u", before: dict[str, Any] | None = None, after: dict[str, Any] | None = None,
       origin: str | None = None, key: dict[str, Any] | None = None) -> Event:
    return Event("t", 0, 7, key or {"id": 1}, {
        "op": op, "before": before, "after": after, "origin": origin, "event_id": "e-1",
        "ts_ms": 1, "source": {"schema": "public", "table": "orders", "ts_ms": 2}})


ROW = {"id": 1, "number": "A-1", "status": "paid", "total": Decimal("19.99"),
       "email": "a@b.c", "qty": "3", "placed": dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)}


def test_echo_from_the_target_is_skipped_and_other_origins_pass() -> None:
    lg = logic()
    assert "echo" in (lg.skip_reason(ev(after=ROW, origin="erp")) or "")
    assert lg.skip_reason(ev(after=ROW, origin="pim")) is None
    assert lg.skip_reason(ev(after=ROW)) is None


def test_ops_where_and_origin_filters() -> None:
    lg = logic("""    filter:
      ops: [c, u]
      exclude_origins: [wms]
      where:
        - {field: status, in: [paid, shipped]}
        - {field: total, ge: 10.5}
        - {field: $before.status, ne: paid}
        - {field: email, exists: true}
""")
    good = ev(before={**ROW, "status": "new"}, after=ROW)
    assert lg.skip_reason(good) is None
    assert "op 'd'" in (lg.skip_reason(ev(op="d", before=ROW)) or "")
    assert "excluded" in (lg.skip_reason(ev(after=ROW, before=ROW, origin="wms")) or "")
    assert "status in" in (lg.skip_reason(ev(before=ROW, after={**ROW, "status": "new"})) or "")
    assert "total ge" in (lg.skip_reason(ev(before={**ROW, "status": "x"},
                                            after={**ROW, "total": Decimal("3")})) or "")
    assert "$before.status ne" in (lg.skip_reason(ev(before=ROW, after=ROW)) or "")


def test_changed_condition() -> None:
    lg = logic("    filter: {where: [{field: status, changed: true}]}\n")
    assert lg.skip_reason(ev(before=ROW, after={**ROW, "status": "x"})) is None
    assert lg.skip_reason(ev(before=ROW, after=ROW)) is not None
    assert lg.skip_reason(ev(op="c", after=ROW)) is None


def test_passthrough_mapping_is_json_ready() -> None:
    out = logic().map(ev(after=ROW))
    assert out == {"id": 1, "number": "A-1", "status": "paid", "total": 19.99, "email": "a@b.c",
                   "qty": "3", "placed": "2024-05-01T12:00:00Z"}


def test_declared_mapping_renames_converts_nests_templates() -> None:
    lg = logic("""    mapping:
      select: [id]
      fields:
        orderNo: number
        amount: {from: total, type: decimal}
        qty: {from: qty, type: int}
        customer.email: email
        customer.tier: {const: gold}
        label: {template: "{number} ({$op}) {{x}}"}
        key: {from: $key.id, type: string}
        when: {from: placed, type: epoch_ms}
        note: {from: missing, default: none}
""")
    assert lg.map(ev(after=ROW)) == {
        "id": 1, "orderNo": "A-1", "amount": "19.99", "qty": 3,
        "customer": {"email": "a@b.c", "tier": "gold"}, "label": "A-1 (u) {x}", "key": "1",
        "when": 1714564800000, "note": "none"}


def test_delete_maps_the_before_image() -> None:
    lg = logic("    mapping: {fields: {orderNo: number}}\n")
    assert lg.map(ev(op="d", before=ROW)) == {"orderNo": "A-1"}
    assert logic().map(ev(op="d", before=None)) is None


def test_failing_conversion_is_a_mapping_error_naming_the_field() -> None:
    lg = logic("    mapping: {fields: {n: {from: number, type: int}}}\n")
    with pytest.raises(MappingError, match="mapping n: cannot convert 'A-1' to int"):
        lg.map(ev(after=ROW))


def test_conversions() -> None:
    assert convert("yes", "bool") is True
    assert convert(Decimal("2.50"), "float") == 2.5
    assert convert("2024-05-01T00:00:00Z", "date") == "2024-05-01"
    assert convert('{"a": 1}', "json") == {"a": 1}
    with pytest.raises(ValueError):
        convert(Decimal("2.5"), "int")
    assert jsonable(Decimal("0.1000000000000000000001")) == "0.1000000000000000000001"
    assert jsonable(b"\x00\x01") == "AAE="
