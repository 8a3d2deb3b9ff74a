"""Settings of the ``sql`` connector: upserts and deletes into a table of any database SQLAlchemy
speaks to (MySQL/MariaDB through ``mysql+pymysql://``, SQLite through ``sqlite:///``, SQL
Server, ...). The ``postgres`` connector stays the fast path for PostgreSQL targets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from connectors.base import ConnectorSettings


class SqlSettings(ConnectorSettings):
    """Upsert each record's payload into ``table`` (by ``key``); deletes delete by key."""

    type: Literal["sql"]
    url: SecretStr = Field(description="SQLAlchemy URL, e.g. mysql+pymysql://u:${PW}@host/db, "
                           "from ${VAR}")
    table: str = Field(description="target table, optionally schema-qualified")
    key: list[str] | None = Field(None, description="match columns; default the primary key")
    columns: list[str] | None = Field(
        None, description="columns written; default every payload field (each must exist)")
    on_delete: Literal["delete", "ignore"] = Field("delete", description="what a delete does")
    max_batch: int = Field(500, ge=1, le=10_000, description="records per transaction")
    connect_timeout_s: float = Field(5, gt=0)
