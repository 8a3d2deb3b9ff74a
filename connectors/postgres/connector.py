"""Batched upserts/deletes into a PostgreSQL table.

A batch is one transaction: records are applied in order (consecutive records of the same shape
share one ``executemany``), so several changes of one key inside a batch end in the right state.
When a batch fails on a data error, it is replayed record by record (one transaction each) to
find the culprit: only that record goes dead, later records of its key are not attempted, the
others are written. Connection loss and serialization failures are transient.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from connectors.base import (
    NOT_ATTEMPTED,
    Connector,
    LetGo,
    Outcome,
    Record,
    ensure_live,
    one_by_one,
)
from connectors.postgres.configuration import PostgresSettings
from pipeline.db import connect
from pipeline.errors import CatalogError, DxError, TerminalError, TransientError

_TRANSIENT_SQLSTATE = ("08", "40", "53", "57")  # connection, rollback/deadlock, resources, admin


def _classify(err: psycopg.Error) -> DxError:
    state = getattr(err, "sqlstate", None) or ""
    text = " ".join(str(err).split())[:300]
    lost = isinstance(err, psycopg.OperationalError) and not state
    if lost or state[:2] in _TRANSIENT_SQLSTATE:
        return TransientError(f"postgres: {text}")
    return TerminalError(f"postgres [{state}]: {text}")


class PostgresConnector(Connector[PostgresSettings]):
    settings_model = PostgresSettings

    def __init__(self, settings: PostgresSettings, *, route: str) -> None:
        super().__init__(settings, route=route)
        schema, _, table = settings.table.rpartition(".")
        self.schema = schema or "public"
        self.table = table
        self.lock = threading.Lock()  # one connection, one transaction at a time
        self.conn: psycopg.Connection[Any] | None = None
        self.column_types: dict[str, str] = {}
        self.key: list[str] = []

    @property
    def max_batch(self) -> int:
        return self.settings.max_batch

    def _connect(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed:
            self.conn = connect(self.settings.url.get_secret_value(),
                                application_name=f"dx-sink-{self.route}",
                                connect_timeout_s=self.settings.connect_timeout_s)
        return self.conn

    def open(self) -> None:
        """Check the table, its key and the configured columns against the target catalog."""
        conn = self._connect()
        rows = conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
            "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
            (sql.Identifier(self.schema, self.table).as_string(conn),)).fetchall()
        if not rows:
            raise CatalogError(f"target table {self.schema}.{self.table} does not exist")
        self.column_types = {str(n): str(t) for n, t in rows}
        pk = [str(r[0]) for r in conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = to_regclass(%s) AND i.indisprimary "
            "ORDER BY array_position(i.indkey, a.attnum)",
            (sql.Identifier(self.schema, self.table).as_string(conn),)).fetchall()]
        conn.commit()
        self.key = list(self.settings.key or pk)
        if not self.key:
            raise CatalogError(f"target table {self.schema}.{self.table} has no primary key; "
                               "set connector.key")
        for col in [*self.key, *(self.settings.columns or [])]:
            if col not in self.column_types:
                raise CatalogError(f"column {col!r} does not exist in {self.schema}.{self.table}"
                                   f" (columns: {', '.join(self.column_types)})")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    # -- statements -----------------------------------------------------------------------------

    def _value(self, col: str, v: Any) -> Any:
        if isinstance(v, dict) or (isinstance(v, list) and "json" in self.column_types[col]):
            return Jsonb(v)
        return v

    def _upsert(self, cols: tuple[str, ...]) -> sql.Composed:
        table = sql.Identifier(self.schema, self.table)
        updates = [c for c in cols if c not in self.key]
        action = (sql.SQL("DO UPDATE SET ") + sql.SQL(", ").join(
            sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c))
            for c in updates)) if updates else sql.SQL("DO NOTHING")
        return sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) {}").format(
            table, sql.SQL(", ").join(map(sql.Identifier, cols)),
            sql.SQL(", ").join(sql.Placeholder() * len(cols)),
            sql.SQL(", ").join(map(sql.Identifier, self.key)), action)

    def _delete(self) -> sql.Composed:
        return sql.SQL("DELETE FROM {} WHERE {}").format(
            sql.Identifier(self.schema, self.table),
            sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(k))
                                  for k in self.key))

    def _statement(self, r: Record) -> tuple[Any, tuple[Any, ...]] | None:
        """(statement shape, params) for one record; None when there is nothing to do."""
        if r.is_delete:
            if self.settings.on_delete == "ignore":
                return None
            source = r.payload or r.key
            try:
                return ("delete", tuple(source[k] for k in self.key))
            except KeyError as err:
                raise TerminalError(f"delete needs key column {err.args[0]!r} in the payload "
                                    "or the event key") from None
        payload = r.payload or {}
        wanted = self.settings.columns
        cols = tuple(wanted) if wanted else tuple(payload)
        unknown = [c for c in cols if c not in self.column_types]
        if unknown:
            raise TerminalError(f"fields {unknown} are not columns of "
                                f"{self.schema}.{self.table}")
        missing = [k for k in self.key if k not in cols]
        if missing:
            raise TerminalError(f"payload lacks key column(s) {missing}")
        return (cols, tuple(self._value(c, payload.get(c)) for c in cols))

    def _apply(self, conn: psycopg.Connection[Any], stmts: list[tuple[Any, tuple[Any, ...]]]
               ) -> None:
        i = 0
        with conn.cursor() as cur:
            while i < len(stmts):
                shape = stmts[i][0]
                j = i
                while j < len(stmts) and stmts[j][0] == shape:
                    j += 1
                query = self._delete() if shape == "delete" else self._upsert(shape)
                cur.executemany(query, [p for _, p in stmts[i:j]])
                i = j

    # -- delivery -------------------------------------------------------------------------------

    def deliver(self, batch: Sequence[Record]) -> list[Outcome]:
        with self.lock:
            try:
                conn = self._connect()
            except DxError as err:
                return [Outcome.failed(err)] * len(batch)
            try:
                ensure_live()  # (lanes wait for the one connection: a revoke may have come)
                stmts = [s for s in (self._statement(r) for r in batch) if s is not None]
                self._apply(conn, stmts)
                ensure_live()  # a row lock can hold a statement past the revoke's wait
                conn.commit()
                return [Outcome(status=200, request=f"{len(batch)} row(s) in one transaction")
                        for _ in batch]
            except LetGo:
                self._reset(conn)
                return [Outcome.failed(NOT_ATTEMPTED)] * len(batch)
            except (psycopg.Error, TerminalError) as err:
                self._reset(conn)
                error = _classify(err) if isinstance(err, psycopg.Error) else err
                if error.transient:
                    return [Outcome.failed(error)] * len(batch)
            return self._one_by_one(conn, batch)

    def _reset(self, conn: psycopg.Connection[Any]) -> None:
        try:
            conn.rollback()
        except psycopg.Error:
            conn.close()
            self.conn = None

    def _one_by_one(self, conn: psycopg.Connection[Any], batch: Sequence[Record]
                    ) -> list[Outcome]:
        def attempt(r: Record) -> Outcome:
            nonlocal conn
            try:
                stmt = self._statement(r)
                if stmt is not None:
                    self._apply(conn, [stmt])
                ensure_live()
                conn.commit()
                return Outcome(status=200, request="1 row")
            except LetGo:
                self._reset(conn)
                raise
            except (psycopg.Error, TerminalError) as err:
                self._reset(conn)
                if self.conn is None:
                    conn = self._connect()
                error = _classify(err) if isinstance(err, psycopg.Error) else err
                return Outcome.failed(error, response=str(err)[:500])

        return one_by_one(batch, attempt)
