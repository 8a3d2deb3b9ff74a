"""Source (inbound) routes: a topic a third-party system writes to, validated and applied to one
table of the shop's database exactly once.

A route names *what* may be written (``columns``, an allow-list; ``fields``, renames from the
producer's field names to columns) and *how* (``mode``, ``conflict``). Everything is checked
against the live catalog when a worker starts (``pipeline.source.catalog``), so a typo in a column
name fails the worker with the dx.yaml line instead of failing every event.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.config.inbound import InboundConfig
from pipeline.config.names import TableRef, check_topic

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConflictPolicy(_Base):
    """How an incoming row competes with the row already stored under the same key.

    Both policies compare ``column`` (a version or source timestamp: any orderable column) of the
    incoming row against the stored row; the higher value wins, so the outcome does not depend on
    the order events arrive in.

    - ``last-writer-wins``: an older version is recorded as a *skipped* task (not an error).
    - ``reject-older``: an older version is a *dead* task with a dead letter (someone should look).

    Content decides the rest (README, "Two-way sync"): an event whose values equal the stored
    row's apart from ``column`` changes nothing and is not written — a duplicate at an equal
    version, an echo at a newer one (systems that bump a version on every write they receive
    would otherwise send a change around forever). An equal version with *other* values is a
    tie, which exactly one side must yield: ``ties`` says whether dx does.
    """

    column: str = Field(description="target column holding the version or source timestamp")
    policy: Literal["last-writer-wins", "reject-older"] = Field(
        "last-writer-wins", description="what happens to an event older than the stored row"
    )
    ties: Literal["stored", "incoming"] = Field(
        "stored",
        description="an equal version with other values: stored keeps the stored row (the "
        "target must take an equal version from dx); incoming applies it (for targets that "
        "accept only a newer version)",
    )


class SourceRoute(_Base, TableRef):
    """One inbound route: ``topic`` -> validate -> apply to ``table``."""

    table_ref: ClassVar[str] = "table"

    name: str = Field(description="route name: `dx source run NAME`, offsets and tasks key")
    topic: str = Field(description="inbound Kafka topic")
    format: Literal["avro", "json"] = Field(
        "avro", description="avro: Confluent wire format via the registry; json: UTF-8 JSON"
    )
    origin: str | None = Field(
        None,
        description="system name recorded as the change's origin (dx.origin); default the "
        "route name. Sink routes never deliver a change back to its origin.",
    )
    table: str = Field(description="target table, optionally schema-qualified (default public)")
    key: list[str] | None = Field(
        None, description="target key columns; default the primary key (needs a unique index)"
    )
    fields: dict[str, str] = Field(
        default_factory=dict, description="producer field -> target column renames"
    )
    columns: list[str] | None = Field(
        None, description="columns the route may write (allow-list); default every column"
    )
    ignore_fields: list[str] = Field(
        default_factory=list,
        description="producer fields dropped on purpose; any other unknown field fails the event",
    )
    mode: Literal["upsert", "insert", "delete", "upsert+delete"] = Field(
        "upsert",
        description="upsert+delete also applies tombstones and op=d; upsert/insert record "
        "deletes as skipped tasks",
    )
    conflict: ConflictPolicy | None = Field(
        None, description="version/timestamp comparison; default: the latest event wins"
    )
    batch_size: int = Field(5000, ge=1, le=100_000, description="events per transaction")
    batch_timeout_ms: int = Field(
        200, ge=1, le=60_000, description="apply a partial batch after this long"
    )
    group_id: str | None = Field(None, description="consumer group; default dx-source-<name>")
    dead_letter_topic: str | None = Field(
        None, description="where failed events go; default <topic>.dlq"
    )
    start: Literal["earliest", "latest"] = Field(
        "earliest", description="where to start a partition with no stored offset"
    )
    commit_to_kafka: bool = Field(
        True,
        description="also commit offsets to Kafka after each batch, for lag tools only; "
        "the offsets in dx.source_offsets are the source of truth",
    )
    inbound: InboundConfig | None = Field(
        None, description="webhooks, scheduled pulls and file drops feeding this route's topic "
        "(format json); see 'dx inbound'")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use letters, digits, '.', '_' and '-' (at most 100)")
        return v

    _topic = field_validator("topic", "dead_letter_topic")(
        classmethod(lambda cls, v: check_topic(v)))

    @field_validator("key", "columns")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("column names must be unique and the list non-empty")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SourceRoute:
        targets = list(self.fields.values())
        if len(set(targets)) != len(targets):
            raise ValueError("fields: two producer fields map to the same column")
        if self.columns is not None:
            for col in targets:
                if col not in self.columns:
                    raise ValueError(f"fields: column {col!r} is not in 'columns'")
            if self.conflict is not None and self.conflict.column not in self.columns:
                raise ValueError(f"conflict.column {self.conflict.column!r} is not in 'columns'")
        if self.inbound is not None and self.format != "json":
            raise ValueError("inbound (webhook, pull, files) produces JSON: set format: json")
        if self.conflict is not None and self.mode in ("insert", "delete"):
            raise ValueError(f"conflict applies to upserts; mode {self.mode!r} has none")
        return self

    @property
    def system(self) -> str:
        """The origin recorded for changes this route applies."""
        return self.origin or self.name

    @property
    def group(self) -> str:
        return self.group_id or f"dx-source-{self.name}"

    @property
    def dlq_topic(self) -> str:
        return self.dead_letter_topic or f"{self.topic}.dlq"

    def column_for(self, field: str) -> str:
        """The target column a producer field writes (identity unless renamed)."""
        return self.fields.get(field, field)

    def field_for(self, column: str) -> str:
        """The producer field that writes a column (for messages in the producer's terms)."""
        for src, dst in self.fields.items():
            if dst == column:
                return src
        return column
