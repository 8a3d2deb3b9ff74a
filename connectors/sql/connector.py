"""Batched upserts/deletes into a table through SQLAlchemy Core.

The table is reflected from the target's catalog at ``open()`` (its columns and primary key), so
configured names are checked against the catalog and every statement is built by SQLAlchemy with
quoted identifiers. An upsert is the dialect's own where it has one (MySQL/MariaDB
``ON DUPLICATE KEY UPDATE``, SQLite and PostgreSQL ``ON CONFLICT``), elsewhere an UPDATE by key
followed by an INSERT when no row matched.

A batch is one transaction, records applied in order (several changes of one key end in the
right state). When a batch fails on a data error, it is replayed record by record (one
transaction each): only the culprit goes dead, later records of its key are not attempted, the
others are written. Lost connections, deadlocks and lock timeouts are transient.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc

from connectors.base import (
    NOT_ATTEMPTED,
    Connector,
    LetGo,
    Outcome,
    Record,
    ensure_live,
    one_by_one,
)
from connectors.sql.configuration import SqlSettings
from pipeline.errors import CatalogError, DxError, ServiceUnavailable, TerminalError, TransientError
from pipeline.observability.logging import redact

#: driver error codes that mean "try again": MySQL deadlock / lock wait timeout
_TRANSIENT_CODES = {1205, 1213, 2006, 2013}


def _classify(err: exc.SQLAlchemyError) -> DxError:
    text = " ".join(str(getattr(err, "orig", err)).split())[:300]
    code = getattr(getattr(err, "orig", None), "args", (None,))[0]
    if isinstance(err, exc.DBAPIError) and err.connection_invalidated:
        return TransientError(f"sql: connection lost: {text}")
    if isinstance(err, exc.OperationalError | exc.TimeoutError | exc.DisconnectionError) or (
            isinstance(code, int) and code in _TRANSIENT_CODES):
        return TransientError(f"sql: {text}")
    return TerminalError(f"sql: {text}")


class SqlConnector(Connector[SqlSettings]):
    settings_model = SqlSettings

    def __init__(self, settings: SqlSettings, *, route: str) -> None:
        super().__init__(settings, route=route)
        schema, _, table = settings.table.rpartition(".")
        self.schema = schema or None
        self.table_name = table
        self.lock = threading.Lock()  # one transaction at a time keeps batches in order
        self.engine: sa.Engine | None = None
        self.table: sa.Table
        self.key: list[str] = []

    @property
    def max_batch(self) -> int:
        return self.settings.max_batch

    def open(self) -> None:
        """Reflect the table; check its key and the configured columns."""
        url = self.settings.url.get_secret_value()
        try:
            self.engine = sa.create_engine(url, pool_pre_ping=True, **_connect_args(
                url, self.settings.connect_timeout_s))
        except (exc.ArgumentError, exc.NoSuchModuleError) as err:
            raise CatalogError(f"sql connector: bad url {redact(url)}: {err}") from None
        try:
            self.table = sa.Table(self.table_name, sa.MetaData(), schema=self.schema,
                                  autoload_with=self.engine)
        except exc.NoSuchTableError:
            raise CatalogError(f"target table {self.settings.table} does not exist") from None
        except exc.SQLAlchemyError as err:
            error = _classify(err)
            if error.transient:
                raise ServiceUnavailable("sql target", redact(url), str(error)) from None
            raise error from None
        pk = [c.name for c in self.table.primary_key.columns]
        self.key = list(self.settings.key or pk)
        if not self.key:
            raise CatalogError(f"target table {self.settings.table} has no primary key; "
                               "set connector.key")
        for col in [*self.key, *(self.settings.columns or [])]:
            if col not in self.table.c:
                raise CatalogError(f"column {col!r} does not exist in {self.settings.table} "
                                   f"(columns: {', '.join(self.table.c.keys())})")

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()

    # -- statements -------------------------------------------------------------------------

    def _where(self, values: dict[str, Any]) -> Any:
        return sa.and_(*(self.table.c[k] == values[k] for k in self.key))

    def _row(self, r: Record) -> dict[str, Any]:
        payload = r.payload or {}
        cols = self.settings.columns or list(payload)
        unknown = [c for c in cols if c not in self.table.c]
        if unknown:
            raise TerminalError(f"fields {unknown} are not columns of {self.settings.table}")
        missing = [k for k in self.key if k not in cols]
        if missing:
            raise TerminalError(f"payload lacks key column(s) {missing}")
        return {c: payload.get(c) for c in cols}

    def _apply(self, conn: sa.Connection, r: Record) -> None:
        if r.is_delete:
            if self.settings.on_delete == "ignore":
                return
            source = r.payload or r.key
            try:
                keys = {k: source[k] for k in self.key}
            except KeyError as err:
                raise TerminalError(f"delete needs key column {err.args[0]!r} in the payload "
                                    "or the event key") from None
            conn.execute(sa.delete(self.table).where(self._where(keys)))
            return
        row = self._row(r)
        updates = {c: v for c, v in row.items() if c not in self.key}
        dialect = conn.dialect.name
        if dialect in ("mysql", "mariadb"):
            from sqlalchemy.dialects.mysql import insert as mysql_insert

            stmt = mysql_insert(self.table).values(row)
            conn.execute(stmt.on_duplicate_key_update(**updates) if updates
                         else stmt.prefix_with("IGNORE"))
        elif dialect in ("sqlite", "postgresql"):
            insert: Any
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert
            else:
                from sqlalchemy.dialects.postgresql import insert
            stmt = insert(self.table).values(row)
            conn.execute(stmt.on_conflict_do_update(index_elements=self.key, set_=updates)
                         if updates else stmt.on_conflict_do_nothing(index_elements=self.key))
        else:  # portable: update by key, insert when nothing matched
            done = conn.execute(sa.update(self.table).where(self._where(row)).values(updates)
                                ) if updates else None
            if done is None or done.rowcount == 0:
                exists = conn.execute(sa.select(sa.literal(1)).select_from(self.table)
                                      .where(self._where(row))).first()
                if exists is None:
                    conn.execute(sa.insert(self.table).values(row))

    # -- delivery -----------------------------------------------------------------------------

    def deliver(self, batch: Sequence[Record]) -> list[Outcome]:
        assert self.engine is not None, "open() first"
        with self.lock:
            try:
                with self.engine.begin() as conn:
                    ensure_live()  # (lanes wait for the lock: a revoke may have come)
                    for r in batch:
                        self._apply(conn, r)
                    ensure_live()  # before the commit: a lock wait can outlast the revoke's
                return [Outcome(status=200, request=f"{len(batch)} row(s) in one transaction")
                        for _ in batch]
            except LetGo:  # rolled back
                return [Outcome.failed(NOT_ATTEMPTED)] * len(batch)
            except (exc.SQLAlchemyError, TerminalError) as err:
                error = _classify(err) if isinstance(err, exc.SQLAlchemyError) else err
                if error.transient:
                    return [Outcome.failed(error)] * len(batch)
            return self._one_by_one(batch)

    def _one_by_one(self, batch: Sequence[Record]) -> list[Outcome]:
        assert self.engine is not None
        engine = self.engine

        def attempt(r: Record) -> Outcome:
            try:
                with engine.begin() as conn:
                    self._apply(conn, r)
                    ensure_live()
                return Outcome(status=200, request="1 row")
            except (exc.SQLAlchemyError, TerminalError) as err:
                error = _classify(err) if isinstance(err, exc.SQLAlchemyError) else err
                return Outcome.failed(error, response=str(err)[:500])

        return one_by_one(batch, attempt)


def _connect_args(url: str, timeout_s: float) -> dict[str, Any]:
    if url.startswith("mysql") or url.startswith("mariadb"):
        return {"connect_args": {"connect_timeout": max(1, int(timeout_s))}}
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": timeout_s}}
    return {}
