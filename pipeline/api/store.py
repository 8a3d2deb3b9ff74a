"""Writes through the API: one transaction per request, or one savepoint per row.

Every write transaction starts with ``mark_origin(<system of the API key>)``
(transaction-local, exactly what a source worker does), so the capture triggers record the
change's origin and no route delivers it back to the system that made it.

*Transactional* (default): problems found by validation reject the request before the database
is touched; otherwise each row runs in a savepoint so that every row PostgreSQL refuses
(duplicate key, foreign key, check) is reported at its own path, and if any was refused the
whole transaction is rolled back. A batch of creates first tries multi-row ``INSERT ... VALUES
(...), (...) RETURNING`` statements (one per field set, up to :data:`ROWS_PER_INSERT` rows each)
and only when PostgreSQL refuses one of them starts over with a savepoint per row, so the common
case costs one round trip per field set. ``RETURNING`` lists the rows in ``VALUES`` order (what
Django's ``bulk_create`` relies on too); a statement that returns another number of rows than it
was given (a trigger skipping one) takes the row-by-row path instead of guessing.

*Per-entity* (``X-Dx-Transaction: per-entity``): the same savepoints, but the transaction
commits what succeeded; the response lists saved rows and the problems of the others.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psycopg
from psycopg import sql

from pipeline.api.catalog import Entity, Field, Relation
from pipeline.api.errors import ApiError, Problem, fail, join_path
from pipeline.api.query import Row, get_row, to_row
from pipeline.api.statements import key_condition
from pipeline.capture.origin import mark_origin
from pipeline.db import connect
from pipeline.row_errors import describe, is_row_error, log_text

log = logging.getLogger(__name__)

#: Rows per multi-row INSERT (PostgreSQL takes at most 65,535 bind parameters per statement).
ROWS_PER_INSERT = 1000
_MAX_PARAMS = 65_535


class Pool:
    """A small thread-safe pool of connections opened by :func:`pipeline.db.connect`.

    ``connection(autocommit=True)`` is for reads: each statement is its own transaction, as it
    is under READ COMMITTED inside one, without the BEGIN and ROLLBACK round trips around it."""

    def __init__(self, url: str, size: int, *, connect_timeout_s: float = 5.0,
                 statement_timeout_ms: int = 0, acquire_timeout_s: float = 10.0) -> None:
        self._url = url
        self._slots = threading.BoundedSemaphore(size)
        self._idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()
        self._connect_timeout_s = connect_timeout_s
        self._options = f"-c statement_timeout={statement_timeout_ms}"
        self._acquire_timeout_s = acquire_timeout_s
        self._closed = False

    @contextmanager
    def connection(self, *, autocommit: bool = False) -> Iterator[psycopg.Connection[Any]]:
        if not self._slots.acquire(timeout=self._acquire_timeout_s):
            raise fail("unavailable", "all database connections are busy; retry shortly",
                       headers={"Retry-After": "1"})
        conn: psycopg.Connection[Any] | None = None
        try:
            while conn is None:
                try:
                    c = self._idle.get_nowait()
                except queue.Empty:
                    c = connect(self._url, application_name="dx-api",
                                connect_timeout_s=self._connect_timeout_s,
                                options=self._options)
                if c.closed or c.broken:
                    continue
                conn = c
            if autocommit:
                conn.autocommit = True
            yield conn
        finally:
            if conn is not None:
                self._give_back(conn)
            self._slots.release()

    def _give_back(self, conn: psycopg.Connection[Any]) -> None:
        try:
            if not conn.closed and conn.info.transaction_status != \
                    psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()
            if not conn.closed and conn.autocommit:
                conn.autocommit = False
        except psycopg.Error:
            conn.close()
        if conn.closed or conn.broken or self._closed:
            conn.close()
            return
        self._idle.put(conn)

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


class RowProblem(Exception):
    """One row cannot be written; the problems carry paths relative to the row."""

    def __init__(self, problems: list[Problem], status: int | None = None) -> None:
        self.problems = problems
        self.status = status
        super().__init__("; ".join(p.message for p in problems))


class _Uneven(RowProblem):
    """A multi-row INSERT returned another number of rows than it was given."""

    def __init__(self) -> None:
        super().__init__([])


def db_problem(entity: Entity, err: psycopg.Error, path: str) -> Problem:
    """PostgreSQL's refusal of one row as an API problem at the offending field, naming only
    fields the entity exposes (PostgreSQL's own text can quote hidden columns: never sent)."""
    names = {f.col: f.name for f in entity.fields.values()}
    refused = describe(err, names.get)
    log.info("%s: row refused (%s)", entity.alias, log_text(err))
    return Problem(refused.code, refused.message,
                   join_path(path, refused.field) if refused.field else (path or None))


def _same(f: Field, given: Any, stored: Any) -> bool:
    if f.column.type in ("json", "jsonb") and isinstance(given, str):
        try:
            return bool(json.loads(given) == stored)
        except ValueError:
            return False
    return bool(given == stored)


@dataclass
class Op:
    """One row of a write request: what to do, where its problems point, and its result."""

    path: str
    kind: str  # create | replace | update | delete
    values: dict[str, Any] = field(default_factory=dict)
    key: tuple[Any, ...] | None = None
    row: Row | None = None
    created: bool = False
    problems: list[Problem] = field(default_factory=list)


class Writer:
    """Runs the ops of one request on one connection (the caller commits or rolls back)."""

    def __init__(self, conn: psycopg.Connection[Any], entity: Entity, system: str) -> None:
        self.conn = conn
        self.entity = entity
        self.system = system
        self._sp = 0
        self._fresh = True  # nothing but the origin mark done in this transaction yet
        mark_origin(conn, system)

    # ---- single-row statements --------------------------------------------------------------

    def _insert_sql(self, names: tuple[str, ...]) -> str:
        e = self.entity

        def build() -> sql.Composable:
            if not names:
                return sql.SQL("INSERT INTO {} DEFAULT VALUES RETURNING {}").format(
                    e.ident, e.select_list())
            return sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING {}").format(
                e.ident, sql.SQL(", ").join(e.fields[n].ident for n in names),
                sql.SQL(", ").join(sql.Placeholder() for _ in names), e.select_list())

        return e.statements.shaped(("insert", names), build)

    def _insert_rows_sql(self, names: tuple[str, ...], rows: int) -> str:
        """``INSERT ... VALUES ($1, $2), ($3, $4) ... RETURNING``: PostgreSQL's own placeholders,
        run by a ``RawCursor``, because psycopg re-parses ``%s`` statements this long (over 50
        parameters) on every execution."""
        e = self.entity
        width = len(names)

        def build() -> sql.Composable:
            values = ",".join("(" + ",".join(f"${r * width + c + 1}" for c in range(width)) + ")"
                              for r in range(rows))
            return sql.SQL("INSERT INTO {} ({}) VALUES {} RETURNING {}").format(
                e.ident, sql.SQL(", ").join(e.fields[n].ident for n in names), sql.SQL(values),
                e.select_list())

        return e.statements.shaped(("insert rows", names, rows), build)

    def _create(self, op: Op) -> None:
        names = tuple(op.values)
        r = self.conn.execute(self._insert_sql(names), [op.values[n] for n in names]).fetchone()
        assert r is not None
        op.row, op.created = to_row(self.entity, r), True

    def _immutables(self, op: Op, stored: Row) -> None:
        problems = []
        for name, v in op.values.items():
            f = self.entity.fields[name]
            if not f.rule.editable and name not in self.entity.key and not _same(
                    f, v, stored[name]):
                problems.append(Problem("immutable_field", f"{name} cannot be changed",
                                        join_path(op.path, name)))
        if problems:
            raise RowProblem(problems)

    def _update(self, op: Op, sets: dict[str, Any | None], defaults: list[str]) -> None:
        e = self.entity
        assert op.key is not None
        if not sets and not defaults:
            stored = get_row(self.conn, e, op.key)
            assert stored is not None
            op.row = stored
            return

        def build() -> sql.Composable:
            parts = [sql.SQL("{} = %s").format(e.fields[n].ident) for n in sets]
            parts += [sql.SQL("{} = DEFAULT").format(e.fields[n].ident) for n in defaults]
            return sql.SQL("UPDATE {} SET {} WHERE {} RETURNING {}").format(
                e.ident, sql.SQL(", ").join(parts), key_condition(e), e.select_list())

        stmt = e.statements.shaped(("update", tuple(sets), tuple(defaults)), build)
        r = self.conn.execute(stmt, [*sets.values(), *op.key]).fetchone()
        assert r is not None
        op.row = to_row(e, r)

    def _not_found(self, op: Op) -> RowProblem:
        return RowProblem([Problem("not_found", f"no {self.entity.alias} with this id",
                                   op.path or None)])

    def _replace(self, op: Op) -> None:
        e = self.entity
        assert op.key is not None
        stored = get_row(self.conn, e, op.key, lock=True)
        if stored is None:
            blocked = [f for f in e.key_fields if not f.rule.creatable]
            if blocked:
                raise RowProblem([Problem("not_found", f"no {e.alias} with this id (PUT creates "
                                          f"rows only where the key is client-given; use POST)",
                                          op.path or None)])
            problems = [Problem("not_creatable", f"{n} is set by the server",
                                join_path(op.path, n))
                        for n in op.values if not e.fields[n].rule.creatable
                        and n not in e.key]
            problems += [Problem("required", f"{f.name} is required", join_path(op.path, f.name))
                         for f in e.fields.values() if f.required and not f.rule.editable
                         and f.name not in op.values and f.name not in e.key]
            if problems:
                raise RowProblem(problems)
            op.values.update(zip(e.key, op.key, strict=True))
            self._create(op)
            return
        self._immutables(op, stored)
        sets = {n: v for n, v in op.values.items()
                if e.fields[n].rule.editable and n not in e.key}
        defaults = [n for n, f in e.fields.items() if f.rule.editable and n not in e.key
                    and n not in op.values and not f.column.generated]
        self._update(op, sets, defaults)

    def _patch(self, op: Op) -> None:
        e = self.entity
        assert op.key is not None
        stored = get_row(self.conn, e, op.key, lock=True)
        if stored is None:
            raise self._not_found(op)
        self._immutables(op, stored)
        sets = {n: v for n, v in op.values.items()
                if e.fields[n].rule.editable and n not in e.key}
        self._update(op, sets, [])

    def _delete(self, op: Op, entities: Mapping[str, Entity]) -> None:
        e = self.entity
        assert op.key is not None
        stored = get_row(self.conn, e, op.key, lock=True)
        if stored is None:
            raise self._not_found(op)
        for rel in e.relations.values():
            child = entities[rel.child]

            def build(rel: Relation = rel, child: Entity = child) -> sql.Composable:
                cond = sql.SQL(" AND ").join(
                    sql.SQL("{} = %s").format(child.fields[c].ident) for c in rel.child_fields)
                return sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {})").format(
                    child.ident, cond)

            hit = self.conn.execute(e.statements.shaped(("has_children", rel.name), build),
                                    [stored[p] for p in rel.parent_fields]).fetchone()
            if hit and hit[0]:
                raise RowProblem([Problem("has_children", f"{e.alias} still has {rel.name}; "
                                          f"delete them first", join_path(op.path, rel.name))])
        self.conn.execute(e.statements.delete, op.key)
        op.row = stored

    # ---- orchestration ----------------------------------------------------------------------

    def _savepoint(self, fn: Callable[[], None], op: Op) -> bool:
        self._fresh = False
        self._sp += 1
        name = sql.Identifier(f"dx_api_sp{self._sp}")
        self.conn.execute(sql.SQL("SAVEPOINT {}").format(name))
        try:
            fn()
        except RowProblem as err:
            self.conn.execute(sql.SQL("ROLLBACK TO SAVEPOINT {}").format(name))
            op.problems.extend(err.problems)
            op.row = None
            return False
        except psycopg.Error as err:
            if not is_row_error(err):
                raise
            self.conn.execute(sql.SQL("ROLLBACK TO SAVEPOINT {}").format(name))
            op.problems.append(db_problem(self.entity, err, op.path))
            op.row = None
            return False
        self.conn.execute(sql.SQL("RELEASE SAVEPOINT {}").format(name))
        return True

    def _bulk_create(self, ops: Sequence[Op]) -> bool:
        """All creates in multi-row INSERTs (one or more per field set); False when PostgreSQL
        refused any row or a statement did not return one row per row given (nothing of the
        attempt is kept: the transaction, or a savepoint when it had done more, is undone)."""
        shapes: dict[tuple[str, ...], list[Op]] = {}
        for op in ops:
            shapes.setdefault(tuple(op.values), []).append(op)

        def run() -> None:
            for names, group in shapes.items():
                step = max(1, min(ROWS_PER_INSERT, _MAX_PARAMS // max(1, len(names))))
                for at in range(0, len(group), step):
                    chunk = group[at:at + step]
                    if not names:  # DEFAULT VALUES takes one row
                        for op in chunk:
                            self._create(op)
                        continue
                    with psycopg.RawCursor(self.conn) as cur:
                        rows = cur.execute(self._insert_rows_sql(names, len(chunk)),
                                           [op.values[n] for op in chunk for n in names],
                                           ).fetchall()
                    if len(rows) != len(chunk):
                        raise _Uneven()
                    for op, r in zip(chunk, rows, strict=True):
                        op.row, op.created = to_row(self.entity, r), True

        if self._fresh:
            ok = self._undoable(run)
        else:
            ok = self._savepoint(run, Op(path="", kind="create"))
        if not ok:
            for op in ops:
                op.row, op.created = None, False
        return ok

    def _undoable(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` as the transaction's first work (no savepoint round trips); when a row is
        refused, roll the transaction back and mark the origin again for what follows."""
        self._fresh = False
        try:
            fn()
        except (RowProblem, psycopg.Error) as err:
            if isinstance(err, psycopg.Error):
                if not is_row_error(err):
                    raise
                log.info("%s: batch insert refused, retrying row by row (%s)",
                         self.entity.alias, log_text(err))
            self.conn.rollback()
            mark_origin(self.conn, self.system)
            return False
        return True

    def run(self, ops: Sequence[Op], entities: Mapping[str, Entity]) -> None:
        """Apply ``ops`` (each in its own savepoint); problems are recorded on the ops."""
        todo = [op for op in ops if not op.problems]
        if len(todo) > 1 and all(op.kind == "create" for op in todo) and self._bulk_create(todo):
            return
        actions: dict[str, Callable[[Op], None]] = {
            "create": self._create, "replace": self._replace, "update": self._patch,
            "delete": partial(self._delete, entities=entities)}
        for op in todo:
            self._savepoint(partial(actions[op.kind], op), op)


def require_found(ops: Sequence[Op]) -> None:
    """A single-row request whose only problem is 'not_found' answers 404, not 422."""
    if len(ops) == 1 and ops[0].problems:
        raise ApiError(ops[0].problems)
