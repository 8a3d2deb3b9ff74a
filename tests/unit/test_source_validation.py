"""Source routes without services: the route model, value coercion against catalog types,
message shapes (flat, Debezium envelope, Connect JSON, tombstones) and the converter's verdicts."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pytest

from pipeline.config.loader import parse_config
from pipeline.errors import ConfigError
from pipeline.source.catalog import Column, Target
from pipeline.source.decode import shape
from pipeline.source.events import Event, Failure, RawMessage
from pipeline.source.inbound import Converter
from pipeline.source.validate import FieldError, RowValidator, coercer

BASE = """\
database: {url: postgresql://x/y}
kafka: {bootstrap_servers: localhost:9092}
schema_registry: {url: http://localhost:8081}
sources:
  - name: erp-items
    topic: erp.items
    format: json
    table: shop.items
    fields: {title: name}
    mode: upsert+delete
    conflict: {column: version, policy: reject-older}
"""


def route(text: str = BASE):  # type: ignore[no-untyped-def]
    return parse_config(text, env={}).sources[0]


TARGET = Target(
    schema="shop", table="items", key=("id",), version="version",
    columns={
        "id": Column("id", "int4", True),
        "name": Column("name", "varchar", True, precision=5),
        "price": Column("price", "numeric", False, precision=6, scale=2),
        "version": Column("version", "int8", False),
        "tags": Column("tags", "text", False, is_array=True),
        "state": Column("state", "state_t", False, category="E", enum_labels=("new", "old")),
        "at": Column("at", "timestamptz", False),
        "doc": Column("doc", "jsonb", False),
    },
)


def test_route_defaults_and_properties() -> None:
    r = route()
    assert (r.schema_name, r.table_name, r.system, r.group) == (
        "shop", "items", "erp-items", "dx-source-erp-items")
    assert r.dlq_topic == "erp.items.dlq"
    assert r.column_for("title") == "name" and r.field_for("name") == "title"


@pytest.mark.parametrize(("change", "fragment"), [
    ("    mode: upsert+delete\n", "    mode: merge\n"),
    ("    format: json\n", "    format: json\n    colour: red\n"),
    ("    conflict: {column: version, policy: reject-older}\n",
     "    mode2: x\n"),
])
def test_route_rejects_bad_keys(change: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(BASE.replace(change, fragment), env={})
    assert "dx.yaml:" in str(err.value)


def test_conflict_needs_an_upsert_mode() -> None:
    with pytest.raises(ConfigError, match="conflict applies to upserts"):
        parse_config(BASE.replace("mode: upsert+delete", "mode: insert"), env={})


@pytest.mark.parametrize(("col", "value", "expected"), [
    (Column("n", "int4", False), "42", 42),
    (Column("n", "int8", False), 7.0, 7),
    (Column("n", "numeric", False, precision=6, scale=2), "12.5", Decimal("12.5")),
    (Column("n", "numeric", False), 1.25, Decimal("1.25")),
    (Column("b", "bool", False), "yes", True),
    (Column("t", "timestamptz", False), "2024-01-02T03:04:05Z",
     dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)),
    (Column("t", "timestamptz", False), 0, dt.datetime(1970, 1, 1, tzinfo=dt.UTC)),
    (Column("t", "timestamp", False), "2024-01-02T03:04:05+01:00",
     dt.datetime(2024, 1, 2, 2, 4, 5)),
    (Column("d", "date", False), "2024-02-29", dt.date(2024, 2, 29)),
    (Column("j", "jsonb", False), {"a": [1, 2]}, '{"a":[1,2]}'),
    (Column("a", "int4", False, is_array=True), "[1, null, 3]", [1, None, 3]),
    (Column("x", "bytea", False), "\\x0102", b"\x01\x02"),
])
def test_coercions(col: Column, value: object, expected: object) -> None:
    assert coercer(col)(value) == expected


@pytest.mark.parametrize(("col", "value", "fragment"), [
    (Column("n", "int2", False), 40000, "out of range for int2"),
    (Column("n", "int4", False), True, "expected an integer"),
    (Column("n", "int4", False), "4x", "expected an integer"),
    (Column("n", "numeric", False, precision=4, scale=2), "123.4", "does not fit"),
    (Column("n", "numeric", False, precision=6, scale=2), "1.234", "more than 2 decimal"),
    (Column("n", "numeric", False, precision=6, scale=2), 1.7976931348623157e308, "does not fit"),
    (Column("s", "varchar", False, precision=3), "abcd", "4 characters long"),
    (Column("s", "text", False), "a\x00b", "NUL"),
    (Column("s", "text", False), {"a": 1}, "expected a string"),
    (Column("e", "e_t", False, category="E", enum_labels=("a", "b")), "c", "not one of a, b"),
    (Column("j", "json", False), "{oops", "not valid JSON"),
    (Column("u", "uuid", False), "nope", "expected a UUID"),
    (Column("d", "date", False), "2024-02-30", "expected an ISO 8601 date"),
])
def test_coercion_errors(col: Column, value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        coercer(col)(value)


def test_row_validation_names_the_producer_field() -> None:
    v = RowValidator(route(), TARGET)
    row = v.row({"id": "1", "title": "abc", "price": "2.50", "version": 3,
                 "tags": ["x"], "state": "new"})
    assert row == {"id": 1, "name": "abc", "price": Decimal("2.50"), "version": 3,
                   "tags": ["x"], "state": "new"}
    cases = [
        ({"id": 1, "title": None, "version": 1}, "title", "NOT NULL"),
        ({"id": 1, "version": 1}, "title", "missing"),
        ({"id": 1, "title": "a", "version": 1, "colour": "red"}, "colour", "unknown field"),
        ({"id": 1, "name": "a", "version": 1}, "name", "renamed"),
        ({"id": 1, "title": "a"}, "version", "version field is missing"),
        ({"title": "a", "version": 1}, "id", "missing"),
        ({"id": 1, "title": "toolong", "version": 1}, "title", "allows 5"),
    ]
    for record, field, fragment in cases:
        with pytest.raises(FieldError) as err:
            v.row(record)
        assert err.value.field == field, record
        assert fragment in err.value.reason, (record, err.value.reason)


def test_ignored_fields_are_dropped_on_purpose() -> None:
    r = route(BASE.replace("    format: json\n", "    format: json\n    ignore_fields: [sync]\n"))
    assert RowValidator(r, TARGET).row({"id": 1, "title": "a", "version": 1, "sync": 1}) == {
        "id": 1, "name": "a", "version": 1}


def test_shapes() -> None:
    assert shape({"id": 1}, None, None).op == "upsert"
    env = shape({"op": "u", "before": None, "after": {"id": 1}, "event_id": "e"}, {"id": 1},
                None)
    assert (env.op, env.record, env.event_id) == ("upsert", {"id": 1}, "e")
    assert shape({"op": "d", "before": {"id": 1}, "after": None}, None, None).op == "delete"
    assert shape(None, {"id": 1}, None).op == "delete"
    assert shape({"schema": {}, "payload": {"id": 2}}, None, None).record == {"id": 2}
    deleted = shape({"id": 3, "__deleted": "true"}, None, None)
    assert (deleted.op, deleted.record) == ("delete", {"id": 3})
    with pytest.raises(FieldError, match="unsupported envelope op"):
        shape({"op": "t", "after": None}, None, None)
    with pytest.raises(FieldError, match="not a record"):
        shape([1, 2], None, None)


def _enc(v: object) -> bytes | None:
    return None if v is None else (v if isinstance(v, bytes) else json.dumps(v).encode())


def _msg(value: object, key: object = None, offset: int = 0) -> RawMessage:
    enc = _enc
    return RawMessage("erp.items", 0, offset, enc(key), enc(value))


def test_converter_verdicts() -> None:
    c = Converter(route(), TARGET)
    ok = c(_msg({"id": 1, "title": "a", "version": 1}, {"id": 1}))
    assert isinstance(ok, Event) and ok.key == (1,)
    tomb = c(_msg(None, {"id": 1}))
    assert isinstance(tomb, Event) and tomb.op == "delete"
    plain_key = c(_msg(None, b"7"))
    assert isinstance(plain_key, Event) and plain_key.key == (7,)
    bad = c(_msg(b"\xff{not json"))
    assert isinstance(bad, Failure) and "undecodable" in bad.reason
    mismatch = c(_msg({"id": 1, "title": "a", "version": 1}, {"id": 2}))
    assert isinstance(mismatch, Failure) and "differs from the message key" in mismatch.reason
    no_key = c(_msg(None))
    assert isinstance(no_key, Failure) and "needs the key" in no_key.reason


def test_deletes_are_skipped_not_lost_in_upsert_mode() -> None:
    r = route(BASE.replace("mode: upsert+delete", "mode: upsert"))
    out = Converter(r, TARGET)(_msg(None, {"id": 1}))
    assert isinstance(out, Failure) and out.status == "skipped"
    assert "upsert+delete" in out.reason
