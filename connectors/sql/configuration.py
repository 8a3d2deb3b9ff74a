"""Settings of the ``sql`` connector: upserts and deletes into a table of any database SQLAlchemy
speaks to (MySQL/MariaDB through ``mysql+pymysql://``, SQLite through ``sqlite:///``, SQL
Server, ...). The ``postgres`` connector stays the fast path for PostgreSQL targets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from connectors.base import TableSettings


class SqlSettings(TableSettings):
    """Upsert each record's payload into ``table`` (by ``key``); deletes delete by key."""

    type: Literal["sql"]
    url: SecretStr = Field(description="SQLAlchemy URL, e.g. mysql+pymysql://u:${PW}@host/db, "
                           "from ${VAR}")
