"""The statements an API entity keeps: names quoted as ``sql.Identifier`` quotes them, a shape
composed once, and a cache whose size has a bound whatever shapes clients ask for."""

from __future__ import annotations

import pytest
from psycopg import sql

from pipeline.api import statements
from pipeline.api.catalog import Entity, Field
from pipeline.config.api import ApiField
from pipeline.source.catalog import Column


def _entity() -> Entity:
    fields = {name: Field(name=name, column=Column(name=col, type="text", not_null=False),
                          rule=ApiField(), coerce=str, required=False)
              for name, col in (("id", "id"), ("title", 'we"ird'))}
    return Entity(alias="things", schema="public", table='odd"table', index=0, fields=fields,
                  key=("id",), delete=True, max_limit=100)


def test_fixed_statements_quote_every_name() -> None:
    kept = _entity().statements
    assert kept.get == 'SELECT "id", "we""ird" FROM "public"."odd""table" WHERE "id" = %s'
    assert kept.get_locked == kept.get + " FOR UPDATE"
    assert kept.delete == 'DELETE FROM "public"."odd""table" WHERE "id" = %s'


def test_a_reloaded_entity_keeps_statements_of_its_own() -> None:
    one, two = _entity(), _entity()
    assert one.statements is one.statements
    assert one.statements is not two.statements


def test_a_shape_is_composed_once_and_the_cache_has_a_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    kept = _entity().statements
    built: list[str] = []

    def build(text: str) -> sql.Composable:
        built.append(text)
        return sql.SQL(text)

    for _ in range(3):
        assert kept.shaped("a", lambda: build("SELECT 1")) == "SELECT 1"
    assert built == ["SELECT 1"]

    monkeypatch.setattr(statements, "MAX_TEXT", 10)  # too long to keep: composed every time
    for _ in range(2):
        kept.shaped("long", lambda: build("SELECT 12345678"))
    assert built.count("SELECT 12345678") == 2

    monkeypatch.setattr(statements, "MAX_CACHED", 20)  # past the budget the cache starts over
    kept.shaped("b", lambda: build("SELECT 2"))  # 8 + 8 characters kept
    kept.shaped("c", lambda: build("SELECT 3"))  # 24 > 20: only this one is kept now
    kept.shaped("c", lambda: build("SELECT 3"))
    kept.shaped("a", lambda: build("SELECT 1"))
    assert built.count("SELECT 3") == 1 and built.count("SELECT 1") == 2
