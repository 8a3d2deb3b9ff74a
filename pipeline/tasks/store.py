"""Tasks in PostgreSQL (schema ``dx``, table ``dx.task``).

One row per (route, topic, partition, offset): a redelivered message (after a crash, before its
offset was committed) updates its task instead of creating a second one. Statuses:

``pending``    recorded, not delivered yet: parked behind a dead task of the same key, or queued
               for redelivery after ``dx tasks retry``
``retrying``   the last attempt failed transiently; the worker is backing off
``failed``     an attempt failed and the worker stopped before retrying (it will be redelivered
               from Kafka, its offset was not committed). A *redriven* task (``redrive``, its
               offset committed long ago) goes back to ``pending`` instead; one left
               ``retrying``/``failed`` by a killed worker is redriven again and parks its key.
``succeeded``  delivered
``dead``       a terminal error, or retries exhausted; dead-lettered; its key is parked
``skipped``    filtered out, echo-suppressed, or skipped by an operator

Rows that are not resolved yet keep the original Kafka message (``raw_*``), so a retry re-decodes
and re-maps it with the route's *current* configuration (fix the mapping, restart, retry).

Sink workers write through :class:`~pipeline.tasks.writer.TaskWriter`, which batches rows from
all lanes into one transaction and only then acknowledges them: the worker commits a Kafka offset
only after the task's outcome is durable here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal, LiteralString, get_args

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pipeline.db import connect
from pipeline.tasks.keys import key_match

log = logging.getLogger(__name__)

#: The one task-status vocabulary (sink and source tasks, the CLI, alerts, status).
TaskStatus = Literal["pending", "retrying", "failed", "succeeded", "dead", "skipped"]
STATUSES: tuple[TaskStatus, ...] = get_args(TaskStatus)
UNRESOLVED = ("pending", "retrying", "failed", "dead")
#: what an operator's retry and skip apply to (the CLI's and the console's)
ACTIONABLE: dict[str, tuple[TaskStatus, ...]] = {"retry": ("dead", "failed"),
                                                 "skip": ("dead", "failed", "pending")}
#: tasks that keep their original Kafka message (for a redrive)
KEEPS_RAW = UNRESOLVED

# Parking (blocked_keys) and redrivable (redrive_candidates, pending_of_key) tasks include a
# redriven task left ``retrying``/``failed`` by a worker that stopped or died mid-retry: its
# offset was committed long ago, Kafka will not redeliver it, so it is redriven again.

TABLE_DDL = """
CREATE SCHEMA IF NOT EXISTS dx;
CREATE TABLE IF NOT EXISTS dx.task (
    id          bigserial PRIMARY KEY,
    route       text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    key         text,
    event_id    text,
    op          text,
    status      text        NOT NULL CHECK (status IN
                    ('pending', 'retrying', 'failed', 'succeeded', 'dead', 'skipped')),
    attempts    integer     NOT NULL DEFAULT 0,
    error       text,
    import_log  jsonb,
    export_log  jsonb,
    raw_key     bytea,
    raw_value   bytea,
    raw_headers jsonb,
    dlq         jsonb,
    redrive     boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (route, topic, partition, "offset")
);
"""

#: ``--key`` (keys.key_match) compares a key's values whatever its form (``{"id":42}``,
#: ``[42]``): this function is that comparison's one side, indexed (task_key_values_idx) so a
#: key lookup among a million tasks reads the index, not every row. NULL for a key that is not
#: a JSON object or array (a bare ``sku-1``, or text that only looks like JSON). Not PARALLEL
#: SAFE: its exception block is a subtransaction, which a parallel index build cannot start.
KEY_VALUES_FUNCTION = """
CREATE OR REPLACE FUNCTION dx.task_key_values(key text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    doc jsonb;
BEGIN
    IF key IS NULL OR left(key, 1) NOT IN ('{', '[') THEN
        RETURN NULL;
    END IF;
    BEGIN
        doc := key::jsonb;
    EXCEPTION WHEN others THEN
        RETURN NULL;
    END;
    IF jsonb_typeof(doc) = 'object' THEN
        RETURN (SELECT array_agg(value::text ORDER BY value::text) FROM jsonb_each(doc));
    END IF;
    RETURN (SELECT array_agg(value::text ORDER BY value::text)
            FROM jsonb_array_elements(doc));
END
$$;
"""

#: The task table's indexes by name. On an existing table they are built CONCURRENTLY (writers
#: keep writing while a big table is indexed); an empty new table gets them in its own
#: transaction. ``ensure_schema`` creates only the missing (or invalid) ones.
INDEXES: dict[str, str] = {
    "task_route_status_idx": "ON dx.task (route, status, updated_at)",
    "task_unresolved_key_idx": "ON dx.task (route, key, id) "
                               "WHERE status IN ('pending', 'retrying', 'failed', 'dead')",
    "task_updated_idx": "ON dx.task (updated_at)",
    # newest-first pages of the console and 'dx tasks list': ordered index scans
    "task_route_status_id_idx": "ON dx.task (route, status, id)",
    "task_status_id_idx": "ON dx.task (status, id)",
    "task_key_id_idx": "ON dx.task (key, id)",
    "task_key_values_idx": "ON dx.task (dx.task_key_values(key))",
}
_LOCK = "hashtext('dx.task ensure_schema')"
#: held for a whole index build (minutes): not _LOCK, which every worker's start takes briefly
_BUILD_LOCK = "hashtext('dx.task index build')"


def ensure_schema(conn: psycopg.Connection[Any], *, build_indexes: bool = False) -> None:
    """Create the task table and its indexes if missing (idempotent, safe to run concurrently
    with workers).

    An index missing from an existing table (an upgrade that adds one, or a build that failed
    halfway and left it INVALID) is built with ``CREATE INDEX CONCURRENTLY``: a plain CREATE
    INDEX would block every worker's writes for as long as it takes to index millions of rows.
    Only ``build_indexes`` callers (``dx init``) build them — on a big table that takes minutes,
    which a worker's or a command's start should not wait for; the others log that ``dx init``
    is due. The build needs a connection outside a transaction."""
    with conn.transaction():
        conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK})")
        created = conn.execute("SELECT to_regclass('dx.task')").fetchone() == (None,)
        conn.execute(TABLE_DDL)
        if created or _key_function_missing(conn):
            conn.execute(KEY_VALUES_FUNCTION)
        if created or _statistics_missing(conn):
            # how routes and statuses go together: estimated counts per route and status
            conn.execute("CREATE STATISTICS IF NOT EXISTS dx.task_route_status_stats (mcv) "
                         "ON route, status FROM dx.task")
        if created:  # an empty table: no writer to block
            for name, definition in INDEXES.items():
                conn.execute(f"CREATE INDEX {name} {definition}")
            return
        missing = _missing_indexes(conn)
    if missing and build_indexes:
        build_indexes_concurrently(conn, missing)
    elif missing:
        _warn_missing(missing)


def _warn_missing(missing: Iterable[str]) -> None:
    log.warning("dx.task is missing indexes %s; run 'dx init' to build them (without blocking "
                "writers)", ", ".join(missing))


def _key_function_missing(conn: psycopg.Connection[Any]) -> bool:
    return conn.execute(
        "SELECT to_regprocedure('dx.task_key_values(text)')").fetchone() == (None,)


def _statistics_missing(conn: psycopg.Connection[Any]) -> bool:
    return conn.execute(
        "SELECT 1 FROM pg_statistic_ext WHERE stxname = 'task_route_status_stats' "
        "AND stxnamespace = 'dx'::regnamespace").fetchone() is None


def _missing_indexes(conn: psycopg.Connection[Any]) -> dict[str, bool]:
    """Indexes of INDEXES not there or not valid (name: whether an invalid one exists)."""
    valid = dict(conn.execute(
        "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = 'dx.task'::regclass").fetchall())
    return {name: name in valid for name in INDEXES if not valid.get(name)}


def build_indexes_concurrently(conn: psycopg.Connection[Any], missing: dict[str, bool]) -> None:
    """``CREATE INDEX CONCURRENTLY`` each of ``missing`` (dropping an invalid leftover first).
    Only one process builds at a time (a session advisory lock, tried, never waited for: a
    waiting session would hold a snapshot the build itself waits for)."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        _warn_missing(missing)
        return
    autocommit = conn.autocommit
    conn.autocommit = True
    try:
        got = conn.execute(f"SELECT pg_try_advisory_lock({_BUILD_LOCK})").fetchone()
        if not got or not got[0]:
            log.warning("dx.task indexes %s are being built by another process",
                        ", ".join(missing))
            return
        try:
            for name in _missing_indexes(conn):  # again, now that we hold the lock
                log.info("building index dx.%s concurrently", name)
                conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS dx.{name}")
                conn.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} {INDEXES[name]}")
        finally:
            conn.execute(f"SELECT pg_advisory_unlock({_BUILD_LOCK})")
    finally:
        conn.autocommit = autocommit


@dataclass
class TaskRow:
    """A task as a worker records it (one write per state change)."""

    route: str
    topic: str
    partition: int
    offset: int
    status: str
    key: str | None = None
    event_id: str | None = None
    op: str | None = None
    attempts: int = 0
    error: str | None = None
    import_log: dict[str, Any] | None = None
    export_log: dict[str, Any] | None = None
    raw_key: bytes | None = None
    raw_value: bytes | None = None
    raw_headers: list[list[str | None]] | None = None
    dlq: dict[str, Any] | None = None
    redrive: bool = False

    def params(self) -> tuple[Any, ...]:
        """The UPSERT's parameters. PostgreSQL text and jsonb cannot hold NUL (``\\x00``): one
        in an error text, a header or a log would fail the whole batch, so NULs are removed
        from every text and JSON field (the raw key and value are bytea and kept as they are)."""
        return (self.route, self.topic, self.partition, self.offset, _clean(self.key),
                _clean(self.event_id), _clean(self.op), self.status, self.attempts,
                _clean(self.error),
                None if self.import_log is None else Jsonb(_clean(self.import_log)),
                None if self.export_log is None else Jsonb(_clean(self.export_log)),
                self.raw_key, self.raw_value,
                None if self.raw_headers is None else Jsonb(_clean(self.raw_headers)),
                None if self.dlq is None else Jsonb(_clean(self.dlq)), self.redrive)


def _clean(value: Any) -> Any:
    """``value`` with NUL characters removed from every string in it (dict keys too), and
    unpaired surrogates (not valid UTF-8, refused by PostgreSQL) replaced."""
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "replace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


# A parked row (pending) must never overwrite a task that already reached a verdict: that happens
# when a message is redelivered after a crash whose outcome was recorded but not committed. And
# nothing overwrites an operator's ``skipped``: a redrive that read the task before ``dx tasks
# skip`` must not turn it back into ``succeeded``/``dead``/``pending``.
UPSERT = """
INSERT INTO dx.task (route, topic, partition, "offset", key, event_id, op, status, attempts,
                     error, import_log, export_log, raw_key, raw_value, raw_headers, dlq, redrive)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (route, topic, partition, "offset") DO UPDATE SET
    key = EXCLUDED.key, event_id = EXCLUDED.event_id, op = EXCLUDED.op,
    status = EXCLUDED.status, attempts = GREATEST(dx.task.attempts, EXCLUDED.attempts),
    error = EXCLUDED.error,
    import_log = COALESCE(EXCLUDED.import_log, dx.task.import_log),
    export_log = COALESCE(EXCLUDED.export_log, dx.task.export_log),
    raw_key = EXCLUDED.raw_key, raw_value = EXCLUDED.raw_value,
    raw_headers = EXCLUDED.raw_headers, dlq = COALESCE(EXCLUDED.dlq, dx.task.dlq),
    redrive = EXCLUDED.redrive, updated_at = now()
WHERE NOT (EXCLUDED.status = 'pending' AND dx.task.status IN ('dead', 'succeeded', 'skipped'))
  AND NOT (dx.task.status = 'skipped' AND EXCLUDED.status <> 'skipped')
"""

class FilterError(ValueError):
    """A filter value no query can use (unknown status, unreadable time): one clear line."""


@dataclass
class TaskFilter:
    """Which tasks: the one filter of ``dx tasks`` commands and of the console's pages and JSON
    API (so a filter means the same in both); all given conditions hold."""

    ids: Sequence[int] = ()
    status: Sequence[str] = ()
    route: str | None = None
    key: str | None = None
    since: str | None = None  # '2h', '30 minutes', or an ISO 8601 time
    until: str | None = None
    text: str | None = None  # part of the error message, case-insensitive
    limit: int | None = None

    #: the fields a URL or a form carries (``status`` may repeat)
    PARAMS: ClassVar[tuple[str, ...]] = ("route", "key", "since", "until", "text")

    def check(self) -> TaskFilter:
        """Raise FilterError for an unknown status or an unreadable time; ``self`` otherwise."""
        for s in self.status:
            if s not in STATUSES:
                raise FilterError(f"unknown status {s!r}; use one of {', '.join(STATUSES)}")
        for bound in (self.since, self.until):
            if bound:
                try:
                    parse_time(bound)
                except ValueError:
                    raise FilterError(f"bad time {bound!r}: use 30m, 2h, 1d or an ISO time"
                                      ) from None
        return self

    @classmethod
    def from_params(cls, params: Mapping[str, Any],
                    getlist: Callable[[str], Iterable[str]] | None = None) -> TaskFilter:
        """From query or form fields (``getlist`` reads a repeated ``status``). Raises
        FilterError."""
        raw = getlist("status") if getlist else params.get("status")
        statuses = [raw] if isinstance(raw, str) else list(raw or ())
        def opt(name: str) -> str | None:
            v = params.get(name)
            return str(v).strip() or None if v is not None else None

        return cls(status=[str(s) for s in statuses if s], route=opt("route"), key=opt("key"),
                   since=opt("since"), until=opt("until"), text=opt("text")).check()

    def query(self) -> list[tuple[str, str]]:
        """The filter as query parameters (what links and forms carry)."""
        return [("status", s) for s in self.status] + [
            (n, v) for n in self.PARAMS if (v := getattr(self, n))]

    def to_json(self) -> dict[str, Any]:
        return {"status": list(self.status), **{n: getattr(self, n) for n in self.PARAMS}}

    def for_action(self, action: str) -> TaskFilter | None:
        """This filter narrowed to the statuses ``action`` applies to (ACTIONABLE); None when
        none is left (asking the database would read every task of the other statuses to find
        nothing)."""
        allowed = ACTIONABLE[action]
        statuses = [s for s in (self.status or allowed) if s in allowed]
        return replace(self, status=statuses) if statuses else None

    def where(self, *extra: str, before: int | None = None
              ) -> tuple[sql.Composable, list[Any]]:
        """The WHERE clause (empty when nothing is filtered) and its parameters; ``before``
        keeps ids below it (keyset paging). ``extra`` are fixed SQL conditions from the task
        modules, never user input."""
        clauses: list[sql.Composable] = []
        params: list[Any] = []
        if self.ids:
            clauses.append(sql.SQL("id = ANY(%s)"))
            params.append(list(self.ids))
        if len(self.status) == 1:
            # '=' and not '= ANY': PostgreSQL (before 17) reads an index in order only for '=',
            # and newest-first pages need that order
            clauses.append(sql.SQL("status = %s"))
            params.append(self.status[0])
        elif self.status:
            clauses.append(sql.SQL("status = ANY(%s)"))
            params.append(list(self.status))
        if self.route:
            clauses.append(sql.SQL("route = %s"))
            params.append(self.route)
        if self.key:
            cond, args = key_match(self.key)
            clauses.append(cond)
            params.extend(args)
        if self.since:
            clauses.append(sql.SQL("updated_at >= %s"))
            params.append(parse_time(self.since))
        if self.until:
            clauses.append(sql.SQL("updated_at < %s"))
            params.append(parse_time(self.until))
        if self.text:
            clauses.append(sql.SQL("error ILIKE %s"))
            params.append("%" + _like_escape(self.text) + "%")
        if before is not None:
            clauses.append(sql.SQL("id < %s"))
            params.append(before)
        clauses.extend(sql.SQL(e) for e in extra)
        if not clauses:
            return sql.SQL(""), params
        return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(clauses), params


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class TaskStore:
    """Reads and operator actions on tasks (the CLI and the worker's redrive path)."""

    COLUMNS: LiteralString = ('id, route, topic, partition, "offset", key, event_id, op, '
                              'status, attempts, error, created_at, updated_at')

    def __init__(self, conn: psycopg.Connection[Any], *, url: str | None = None,
                 application_name: str = "dx") -> None:
        self.conn = conn
        self.url = url
        self.application_name = application_name

    @classmethod
    def open(cls, url: str, application_name: str) -> TaskStore:
        """A store that reconnects (:meth:`reconnect`) after its connection was lost."""
        return cls(connect(url, application_name=application_name), url=url,
                   application_name=application_name)

    def reconnect(self) -> None:
        """After a failure: roll back, or open a new connection when the old one is gone (a
        PostgreSQL restart). Raises ServiceUnavailable while the database is still down."""
        if not self.conn.closed and not self.conn.broken:
            with contextlib.suppress(psycopg.Error):
                self.conn.rollback()
                return
        if self.url is None:
            return
        with contextlib.suppress(psycopg.Error):
            self.conn.close()
        self.conn = connect(self.url, application_name=self.application_name)

    def close(self) -> None:
        self.conn.close()

    def find(self, f: TaskFilter) -> list[dict[str, Any]]:
        where, params = f.where()
        limit = sql.SQL(" LIMIT {}").format(int(f.limit)) if f.limit else sql.SQL("")
        query = sql.SQL("SELECT {} FROM dx.task{} ORDER BY id{}").format(
            sql.SQL(self.COLUMNS), where, limit)
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)
            return list(cur.fetchall())

    def iter_full(self, f: TaskFilter) -> Iterator[dict[str, Any]]:
        where, params = f.where()
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql.SQL("SELECT * FROM dx.task{} ORDER BY id").format(where), params)
            yield from cur

    def get(self, task_id: int) -> dict[str, Any] | None:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute("SELECT * FROM dx.task WHERE id = %s", (task_id,))
            return cur.fetchone()

    def counts(self, route: str | None = None) -> dict[str, int]:
        sql = "SELECT status, count(*) FROM dx.task"
        params: list[Any] = []
        if route:
            sql += " WHERE route = %s"
            params.append(route)
        rows = self.conn.execute(sql + " GROUP BY status", params).fetchall()
        return {str(s): int(n) for s, n in rows}

    # -- what status and alerts read ---------------------------------------------------------

    def exists(self) -> bool:
        """Whether ``dx.task`` exists yet (no worker or ``dx init`` ran: nothing to read)."""
        found = self.conn.execute("SELECT to_regclass('dx.task')").fetchone() != (None,)
        self.conn.commit()
        return found

    def counts_by_route(self, statuses: Sequence[str] = UNRESOLVED, cap: int | None = None
                        ) -> dict[str, dict[str, int]]:
        """Tasks by route for each of ``statuses`` (the unresolved ones by default: what
        operators and alerts act on), {} before the table exists. Counted on the (route, status,
        id) index, one probe per route and status (the routes found by a skip scan), never a
        read of the table; with ``cap`` a count stops at ``cap + 1``."""
        if not self.exists():
            return {}
        out: dict[str, dict[str, int]] = {}
        for route, status, n in self.conn.execute(
                "WITH RECURSIVE r AS ((SELECT route FROM dx.task ORDER BY route LIMIT 1) "
                "UNION ALL SELECT (SELECT t.route FROM dx.task t WHERE t.route > r.route "
                "ORDER BY t.route LIMIT 1) FROM r WHERE r.route IS NOT NULL) "
                "SELECT r.route, s, (SELECT count(*) FROM (SELECT 1 FROM dx.task t "
                "WHERE t.route = r.route AND t.status = s LIMIT %s) m) "
                "FROM r CROSS JOIN unnest(%s::text[]) s WHERE r.route IS NOT NULL",
                (None if cap is None else cap + 1, list(statuses))):
            if n:
                out.setdefault(str(route), {})[str(status)] = int(n)
        self.conn.commit()
        return out

    def failing_in_window(self, window_s: float) -> dict[str, tuple[int, int]]:
        """Per route: (tasks not succeeding, all tasks) updated in the last ``window_s``."""
        rows = self.conn.execute(
            "SELECT route, count(*) FILTER (WHERE status IN ('dead', 'failed', 'retrying')), "
            "count(*) FROM dx.task WHERE updated_at > now() - make_interval(secs => %s) "
            "GROUP BY route", (window_s,)).fetchall()
        self.conn.commit()
        return {str(r): (int(bad), int(total)) for r, bad, total in rows}

    def first(self, route: str, statuses: Sequence[str], limit: int) -> list[dict[str, Any]]:
        """The oldest ``limit`` tasks of ``route`` in ``statuses``: id, key, error."""
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute("SELECT id, key, error FROM dx.task WHERE route = %s "
                        "AND status = ANY(%s) ORDER BY id LIMIT %s",
                        (route, list(statuses), limit))
            rows = list(cur.fetchall())
        self.conn.commit()
        return rows

    def retry(self, f: TaskFilter) -> list[int]:
        """Queue dead/failed tasks for redelivery by the route's worker (in key order: the
        worker redrives each key's tasks by id). Returns the ids queued."""
        narrowed = f.for_action("retry")
        if narrowed is None:
            return []
        where, params = narrowed.where()
        rows = self.conn.execute(
            sql.SQL("UPDATE dx.task SET status = 'pending', redrive = true, updated_at = now()"
                    "{} RETURNING id").format(where), params).fetchall()
        self.conn.commit()
        return sorted(int(r[0]) for r in rows)

    def skip(self, f: TaskFilter, reason: str = "skipped by operator") -> list[int]:
        """Mark dead/failed/pending tasks skipped; a worker then releases the tasks parked
        behind them. Returns the ids skipped."""
        narrowed = f.for_action("skip")
        if narrowed is None:
            return []
        where, params = narrowed.where()
        rows = self.conn.execute(
            sql.SQL("UPDATE dx.task SET status = 'skipped', redrive = false, raw_key = NULL, "
                    "raw_value = NULL, raw_headers = NULL, updated_at = now(), "
                    "error = %s || coalesce(': ' || error, ''){} RETURNING id").format(where),
            [reason, *params]).fetchall()
        self.conn.commit()
        return sorted(int(r[0]) for r in rows)

    def purge(self, *, older_than_days: float, route: str | None = None,
              statuses: Sequence[str] = ("succeeded", "skipped")) -> int:
        sql = ("DELETE FROM dx.task WHERE status = ANY(%s) "
               "AND updated_at < now() - make_interval(secs => %s)")
        params: list[Any] = [list(statuses), older_than_days * 86400]
        if route:
            sql += " AND route = %s"
            params.append(route)
        n = self.conn.execute(sql, params).rowcount
        self.conn.commit()
        return n

    # -- the worker's side --------------------------------------------------------------------

    def blocked_keys(self, route: str) -> set[tuple[str, str]]:
        """(topic, key) of ``route`` that have unresolved tasks: new events of these keys must
        park. Keys are per topic (see ``pipeline.sink.work.KeyId``): rows written before that
        rule need no migration, they always carried their topic."""
        rows = self.conn.execute(
            "SELECT DISTINCT topic, key FROM dx.task WHERE route = %s "
            "AND (status IN ('dead', 'pending') OR (redrive AND status IN ('retrying', 'failed'))) "
            "AND key IS NOT NULL", (route,)).fetchall()
        self.conn.commit()
        return {(str(r[0]), str(r[1])) for r in rows}

    def redrive_candidates(self, route: str,
                           owned: Iterable[tuple[str, int]]) -> list[tuple[str, str]]:
        """Keys whose pending tasks can go now: no dead task holds them back. Only tasks of the
        ``owned`` (topic, partition) pairs count: with several workers on a route, each one
        redrives the keys of the partitions it owns, so a task is redelivered once, in order."""
        topics, partitions = _owned(owned)
        if not topics:
            return []
        rows = self.conn.execute(
            "SELECT topic, key FROM dx.task t WHERE route = %s "
            "AND (status = 'pending' OR (redrive AND status IN ('retrying', 'failed'))) "
            "AND key IS NOT NULL AND (topic, partition) IN "
            "(SELECT * FROM unnest(%s::text[], %s::int[])) "
            "AND NOT EXISTS (SELECT 1 FROM dx.task d WHERE d.route = t.route "
            "AND d.topic = t.topic AND d.key = t.key AND d.status = 'dead') "
            "GROUP BY topic, key ORDER BY min(id)",
            (route, topics, partitions)).fetchall()
        self.conn.commit()
        return [(str(r[0]), str(r[1])) for r in rows]

    def lock_redrivable(self, route: str, limit: int) -> list[tuple[Any, ...]]:
        """Source routes: up to ``limit`` tasks queued by ``dx tasks retry``, oldest first,
        locked in the caller's transaction (another worker skips them): id, topic, partition,
        offset, attempts, raw_key, raw_value, raw_headers."""
        return self.conn.execute(
            'SELECT id, topic, partition, "offset", attempts, raw_key, raw_value, '
            "raw_headers FROM dx.task WHERE route = %s AND status = 'pending' AND redrive "
            "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED", (route, limit)).fetchall()

    def mark_redriven(self, ids: Sequence[int]) -> None:
        """Source routes: redriven tasks applied, in the caller's transaction."""
        self.conn.execute(
            "UPDATE dx.task SET status = 'succeeded', redrive = false, error = NULL, "
            "attempts = attempts + 1, raw_key = NULL, raw_value = NULL, raw_headers = NULL, "
            "updated_at = now() WHERE id = ANY(%s)", (list(ids),))

    def has_dead(self, route: str, key: tuple[str, str]) -> bool:
        """Whether ``key`` (topic, key text) has a dead task."""
        row = self.conn.execute(
            "SELECT 1 FROM dx.task WHERE route = %s AND topic = %s AND key = %s "
            "AND status = 'dead' LIMIT 1", (route, *key)).fetchone()
        self.conn.commit()
        return row is not None

    def unblocked(self, route: str, keys: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Those of ``keys`` ((topic, key text), parked in a worker) with no unresolved task
        left: an operator skipped or purged what held them."""
        if not keys:
            return []
        rows = self.conn.execute(
            "SELECT * FROM unnest(%s::text[], %s::text[]) EXCEPT SELECT topic, key FROM dx.task "
            "WHERE route = %s AND (status IN ('dead', 'pending') "
            "OR (redrive AND status IN ('retrying', 'failed')))",
            ([t for t, _ in keys], [k for _, k in keys], route)).fetchall()
        self.conn.commit()
        return [(str(r[0]), str(r[1])) for r in rows]

    def pending_of_key(self, route: str, key: tuple[str, str],
                       owned: Iterable[tuple[str, int]]) -> list[dict[str, Any]]:
        """The pending tasks of one key ((topic, key text)) in arrival order, with their
        original messages (only those of the ``owned`` (topic, partition) pairs)."""
        topics, partitions = _owned(owned)
        if not topics:
            return []
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                'SELECT id, topic, partition, "offset", attempts, raw_key, raw_value, '
                "raw_headers, redrive FROM dx.task WHERE route = %s AND topic = %s "
                "AND key = %s "
                "AND (status = 'pending' OR (redrive AND status IN ('retrying', 'failed'))) "
                "AND (topic, partition) IN "
                "(SELECT * FROM unnest(%s::text[], %s::int[])) ORDER BY id",
                (route, *key, topics, partitions))
            rows = list(cur.fetchall())
        return [] if self.has_dead(route, key) else rows


def _owned(owned: Iterable[tuple[str, int]]) -> tuple[list[str], list[int]]:
    pairs = sorted(set(owned))
    return [t for t, _ in pairs], [p for _, p in pairs]


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?|"
                  r"d|days?|w|weeks?)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str) -> dt.datetime:
    """A time bound: an age (``30m``, ``2 hours``, ``1d`` = that long ago) or an ISO 8601 time
    (UTC when no offset is given). ValueError otherwise."""
    m = _AGE.match(text)
    if m:
        unit = m.group(2)[0]
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=float(m.group(1)) * _UNIT_S[unit])
    when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)

