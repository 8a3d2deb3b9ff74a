"""Settings of the ``postgres`` connector.

The target table and every column are checked against the target database's catalog when the
worker starts, and quoted with ``psycopg.sql.Identifier``: configuration never becomes SQL text.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from connectors.base import TableSettings


class PostgresSettings(TableSettings):
    """Upsert each record's payload into ``table`` (by ``key``); deletes delete by key."""

    type: Literal["postgres"]
    url: SecretStr = Field(description="target database URL, from ${VAR}")
