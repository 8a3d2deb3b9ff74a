"""What a captured table looks like to the rest of dx: its exposed columns with their PostgreSQL
types, its key, its topic. The spec is read from the live catalog, validated against dx.yaml, and
stored (versioned) in ``dx.capture_spec`` so a running relay learns about a new column from the
database rather than from a restart."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

_INVALID = re.compile(r"[^A-Za-z0-9_]")


def avro_name(name: str) -> str:
    """A column or schema name made valid for Avro (Debezium's 'avro' adjustment mode): the
    name it has on the wire, which the catalog checks for collisions before capture starts."""
    fixed = _INVALID.sub("_", name)
    return "_" + fixed if not fixed or fixed[0].isdigit() else fixed


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    type: str  # pg_type.typname of the column (element type for arrays)
    nullable: bool
    is_array: bool = False
    precision: int | None = None  # numeric(p, s), varchar(n) length in precision
    scale: int | None = None
    category: str = "U"  # pg_type.typcategory: 'E' enum, 'S' string, 'N' numeric, ...


@dataclass(frozen=True)
class TableSpec:
    entity: str  # schema.table
    schema: str
    table: str
    topic: str
    key: tuple[str, ...]
    columns: tuple[ColumnSpec, ...]

    def column(self, name: str) -> ColumnSpec:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def key_columns(self) -> tuple[ColumnSpec, ...]:
        return tuple(self.column(k) for k in self.key)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TableSpec:
        cols = tuple(ColumnSpec(**c) for c in data["columns"])
        return cls(entity=data["entity"], schema=data["schema"], table=data["table"],
                   topic=data["topic"], key=tuple(data["key"]), columns=cols)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()
