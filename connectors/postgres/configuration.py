"""Settings of the ``postgres`` connector.

The target table and every column are checked against the target database's catalog when the
worker starts, and quoted with ``psycopg.sql.Identifier``: configuration never becomes SQL text.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from connectors.base import ConnectorSettings


class PostgresSettings(ConnectorSettings):
    """Upsert each record's payload into ``table`` (by ``key``); deletes delete by key."""

    type: Literal["postgres"]
    url: SecretStr = Field(description="target database URL, from ${VAR}")
    table: str = Field(description="target table, optionally schema-qualified")
    key: list[str] | None = Field(None, description="conflict columns; default the primary key")
    columns: list[str] | None = Field(
        None, description="columns written; default every payload field (each must exist)")
    on_delete: Literal["delete", "ignore"] = Field("delete", description="what a delete does")
    max_batch: int = Field(500, ge=1, le=10_000, description="records per transaction")
    connect_timeout_s: float = Field(5, gt=0)
