"""The API's entities, checked against dx.yaml and the live catalog and made ready to serve.

Checks (each failure is a :class:`ConfigError` naming the dx.yaml line):
aliases and key ids are unique; scopes, relations and relation fields name things that exist;
the table exists; every field's column exists; generated columns are neither creatable nor
editable; the key is the primary key (or a unique index) and is exposed; validation rules fit the
column's type; a NOT NULL column without a default is exposed and creatable (otherwise no create
could ever succeed) unless the entity is read-only.

Configuration names only travel as bind parameters here; the runtime :class:`Entity` keeps the
catalog's spelling, which every statement quotes with ``psycopg.sql.Identifier``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import psycopg
from psycopg import sql

from pipeline.api.checks import Check, compile_check
from pipeline.api.statements import Statements
from pipeline.config.api import ApiEntity, ApiField
from pipeline.config.model import DxConfig
from pipeline.errors import ConfigError
from pipeline.source.catalog import Column, read_columns
from pipeline.source.validate import Coercer, coercer

_TEXT = {"text", "varchar", "bpchar", "name", "citext"}
_NUMBER = {"int2", "int4", "int8", "numeric", "float4", "float8", "oid"}
_INTS = {"int2", "int4", "int8", "oid"}
_FLOATS = {"numeric", "float4", "float8"}
_ANY = {"json", "jsonb"}


def json_kind(col: Column, *, element: bool = False) -> str:
    """The JSON type a column's values take: integer, number, boolean, string, array, any."""
    if col.is_array and not element:
        return "array"
    if col.category == "E":
        return "string"
    if col.type in _INTS:
        return "integer"
    if col.type in _FLOATS:
        return "number"
    if col.type == "bool":
        return "boolean"
    if col.type in _ANY:
        return "any"
    return "string"


@dataclass(frozen=True)
class Field:
    """One exposed field at run time."""

    name: str
    column: Column
    rule: ApiField
    coerce: Coercer
    required: bool  # on create
    enum: tuple[Any, ...] | None = None  # coerced enum values
    pattern: re.Pattern[str] | None = None
    # worked out once here, not for every value of every request
    kind: str = "string"  # json_kind of the column
    element_kind: str = "string"  # json_kind of an array column's elements
    text_limit: int | None = None  # max_length and varchar(n)/char(n), whichever is smaller

    @property
    def col(self) -> str:
        return self.column.name

    @cached_property
    def check(self) -> Check:
        """A request value -> the column value (raises ``checks.Invalid``)."""
        return compile_check(self)

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.column.name)


@dataclass(frozen=True)
class Relation:
    """Children of an entity: rows of ``child`` whose ``child_fields`` equal ``parent_fields``."""

    name: str
    child: str
    parent_fields: tuple[str, ...]
    child_fields: tuple[str, ...]


@dataclass(frozen=True)
class Entity:
    alias: str
    schema: str
    table: str
    index: int  # position in api.entities (for dx.yaml lines)
    fields: dict[str, Field]
    key: tuple[str, ...]  # public names
    delete: bool
    max_limit: int
    relations: dict[str, Relation] = field(default_factory=dict)

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def key_fields(self) -> tuple[Field, ...]:
        return tuple(self.fields[k] for k in self.key)

    @property
    def creatable(self) -> bool:
        return any(f.rule.creatable for f in self.fields.values())

    @cached_property
    def required(self) -> tuple[Field, ...]:
        """The fields a create must set."""
        return tuple(f for f in self.fields.values() if f.required)

    @cached_property
    def statements(self) -> Statements:
        """Its statements, composed once (per reload: a reload builds new entities)."""
        return Statements(self)

    def select_list(self, alias: str | None = None) -> sql.Composable:
        """Exposed columns, in field order (optionally qualified by a table alias)."""
        if alias is None:
            return sql.SQL(", ").join(f.ident for f in self.fields.values())
        return sql.SQL(", ").join(sql.Identifier(alias, f.col) for f in self.fields.values())


def _fail(config: DxConfig, msg: str, *loc: str | int) -> ConfigError:
    file, line = config.where("api", *loc)
    return ConfigError(msg, file=file, line=line)


def check_references(config: DxConfig) -> None:
    """Checks that need the whole ``api:`` section but no database."""
    api = config.api
    aliases: dict[str, int] = {}
    for i, e in enumerate(api.entities):
        if e.alias in aliases:
            raise _fail(config, f"entity alias {e.alias!r} is used twice", "entities", i, "alias")
        aliases[e.alias] = i
    for i, e in enumerate(api.entities):
        for name, rel in e.relations.items():
            loc: tuple[str | int, ...] = ("entities", i, "relations", name)
            if rel.entity not in aliases:
                raise _fail(config, f"relation {name!r}: no entity with alias {rel.entity!r}",
                            *loc, "entity")
            child = api.entities[aliases[rel.entity]]
            for p, c in rel.on.items():
                if p not in e.fields:
                    raise _fail(config, f"relation {name!r}: {p!r} is not a field of "
                                        f"{e.alias!r}", *loc, "on", p)
                if c not in child.fields:
                    raise _fail(config, f"relation {name!r}: {c!r} is not a field of "
                                        f"{child.alias!r}", *loc, "on", p)
    ids: set[str] = set()
    hashes: set[str] = set()
    for section, creds in (("keys", api.keys), ("clients", api.clients)):
        what = "key" if section == "keys" else "client"
        for i, k in enumerate(creds):
            if k.id in ids:
                raise _fail(config, f"{what} id {k.id!r} is used twice (key and client ids "
                                    "share one namespace)", section, i, "id")
            ids.add(k.id)
            secret = k.secret_env or k.secret_sha256 or ""
            if secret in hashes:
                raise _fail(config, f"{what} {k.id!r} has the same secret as another key or "
                                    "client", section, i)
            hashes.add(secret)
            for alias in k.scopes:
                if alias != "*" and alias not in aliases:
                    raise _fail(config, f"{what} {k.id!r}: scope for unknown entity {alias!r}",
                                section, i, "scopes", alias)


def _is_text(col: Column) -> bool:
    return not col.is_array and (col.type in _TEXT or col.category == "E")


def _is_number(col: Column) -> bool:
    return not col.is_array and col.type in _NUMBER


def _guarded(coerce: Coercer) -> Coercer:
    """The inbound coercer, with decimal arithmetic failures (a number too large for the
    decimal context, e.g. 1e308 for numeric(10,2)) reported as ValueError like the rest."""

    def run(v: Any) -> Any:
        try:
            return coerce(v)
        except ArithmeticError:
            raise ValueError(f"{v!r} is out of range for this column") from None

    return run


def _comparable(a: Column, b: Column) -> bool:
    if a.is_array != b.is_array:
        return False
    ints = {"int2", "int4", "int8"}
    return a.type == b.type or (a.type in ints and b.type in ints) or (
        a.type in _TEXT and b.type in _TEXT)


def _field(config: DxConfig, i: int, e: ApiEntity, name: str, rule: ApiField,
           columns: dict[str, Column]) -> Field:
    loc: tuple[str | int, ...] = ("entities", i, "fields", name)
    colname = rule.column or name
    col = columns.get(colname)
    if col is None:
        raise _fail(config, f"field {name!r}: column {colname!r} does not exist in "
                            f"{e.qualified} (columns: {', '.join(columns)})", *loc)
    if col.generated and (rule.creatable or rule.editable):
        raise _fail(config, f"field {name!r}: column {colname!r} is generated; set "
                            "creatable: false and editable: false", *loc)
    if (rule.min_length is not None or rule.max_length is not None
            or rule.pattern is not None) and not _is_text(col):
        raise _fail(config, f"field {name!r}: length and pattern rules need a text column "
                            f"({colname!r} is {col.type})", *loc)
    if (rule.min_value is not None or rule.max_value is not None) and not _is_number(col):
        raise _fail(config, f"field {name!r}: min_value/max_value need a number column "
                            f"({colname!r} is {col.type})", *loc)
    coerce = _guarded(coercer(col))
    enum: tuple[Any, ...] | None = None
    if rule.enum is not None:
        values = []
        for j, v in enumerate(rule.enum):
            try:
                values.append(coerce(v))
            except ValueError as err:
                raise _fail(config, f"field {name!r}: enum value {v!r}: {err}",
                            *loc, "enum", j) from None
        enum = tuple(values)
    implied = col.not_null and not col.has_default and rule.creatable
    limits = [n for n in (rule.max_length, col.precision if col.type in ("varchar", "bpchar")
                          else None) if n is not None]
    return Field(name=name, column=col, rule=rule, coerce=coerce,
                 required=rule.required or implied, enum=enum,
                 pattern=re.compile(rule.pattern) if rule.pattern is not None else None,
                 kind=json_kind(col), element_kind=json_kind(col, element=True),
                 text_limit=min(limits) if limits else None)


def load_entities(conn: psycopg.Connection[Any], config: DxConfig) -> dict[str, Entity]:
    """Every configured entity, checked against the catalog (ConfigError with the line)."""
    check_references(config)
    api = config.api
    out: dict[str, Entity] = {}
    for i, e in enumerate(api.entities):
        found = read_columns(conn, e.schema_name, e.table_name)
        if found is None:
            raise _fail(config, f"entity {e.alias!r}: table {e.qualified} does not exist",
                        "entities", i, "table")
        columns, uniques = found
        fields = {name: _field(config, i, e, name, rule, columns)
                  for name, rule in e.fields.items()}
        by_column = {f.col: f for f in fields.values()}
        if e.key is not None:
            key = tuple(e.key)
            key_cols = {fields[k].col for k in key}
            if not any(set(cols) == key_cols for _, cols in uniques):
                raise _fail(config, f"entity {e.alias!r}: key ({', '.join(key)}) needs a primary "
                                    "key or unique index on exactly its columns",
                            "entities", i, "key")
        else:
            pk = next((cols for primary, cols in uniques if primary), None)
            if pk is None:
                raise _fail(config, f"entity {e.alias!r}: {e.qualified} has no primary key; set "
                                    "'key:' to fields with a unique index", "entities", i, "table")
            missing = [c for c in pk if c not in by_column]
            if missing:
                raise _fail(config, f"entity {e.alias!r}: primary key column(s) "
                                    f"{', '.join(missing)} must be exposed fields",
                            "entities", i, "fields")
            key = tuple(by_column[c].name for c in pk)
        if any(f.rule.creatable for f in fields.values()):
            for c, col in columns.items():
                if col.not_null and not col.has_default and not col.generated and (
                        c not in by_column or not by_column[c].rule.creatable):
                    raise _fail(config, f"entity {e.alias!r}: column {c!r} is NOT NULL without "
                                        "a default, so it must be an exposed, creatable field "
                                        "(or make every field creatable: false)",
                                "entities", i, "fields")
        out[e.alias] = Entity(alias=e.alias, schema=e.schema_name, table=e.table_name, index=i,
                              fields=fields, key=key, delete=e.delete,
                              max_limit=e.max_limit or api.max_limit)
    # relations need both ends built
    for i, e in enumerate(api.entities):
        rels = {}
        for name, rel in e.relations.items():
            parent, child = out[e.alias], out[rel.entity]
            for p, c in rel.on.items():
                pt, ct = parent.fields[p].column, child.fields[c].column
                if not _comparable(pt, ct):
                    raise _fail(config, f"relation {name!r}: {e.alias}.{p} ({pt.type}) and "
                                        f"{rel.entity}.{c} ({ct.type}) differ in type",
                                "entities", i, "relations", name, "on", p)
            rels[name] = Relation(name=name, child=rel.entity, parent_fields=tuple(rel.on),
                                  child_fields=tuple(rel.on.values()))
        if rels:
            old = out[e.alias]
            out[e.alias] = Entity(alias=old.alias, schema=old.schema, table=old.table,
                                  index=old.index, fields=old.fields, key=old.key,
                                  delete=old.delete, max_limit=old.max_limit, relations=rels)
    return out
