"""The console's task queries that the task store does not offer (yet): newest-first pages with
a keyset cursor, a filter on the error text, counts for a confirmation, the CSV export with the
entity's mapped fields, and per-route last error and failure rate for the dashboard.

Filters reuse :class:`pipeline.tasks.store.TaskFilter` (status, route, key, time range) and add
what the page needs on top; the action itself (retry, skip) is the task store's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pipeline.observability.logging import redact
from pipeline.tasks.store import STATUSES, TaskFilter, TaskStore, parse_time

PAGE_SIZE = 50
#: Task columns of the CSV, before the entity's mapped fields (``data.<field>``).
CSV_COLUMNS = ("id", "route", "status", "attempts", "key", "op", "event_id", "topic",
               "partition", "offset", "error", "http_status", "created_at", "updated_at")


class FilterError(ValueError):
    """A filter value the page cannot use (unknown status, unreadable time)."""


@dataclass
class ConsoleFilter:
    """What the task list shows; lives in the URL, so a filtered view is a shareable link."""

    status: list[str] = field(default_factory=list)
    route: str | None = None
    key: str | None = None
    since: str | None = None
    until: str | None = None
    text: str | None = None  # part of the error message, case-insensitive

    @classmethod
    def from_params(cls, params: Mapping[str, Any], getlist: Any = None) -> ConsoleFilter:
        """From query or form fields (``status`` may repeat). Raises FilterError."""
        statuses = list(getlist("status")) if getlist else _as_list(params.get("status"))
        statuses = [s for s in statuses if s]
        for s in statuses:
            if s not in STATUSES:
                raise FilterError(f"unknown status {s!r}; use one of {', '.join(STATUSES)}")

        def opt(name: str) -> str | None:
            v = params.get(name)
            return str(v).strip() or None if v is not None else None

        f = cls(statuses, opt("route"), opt("key"), opt("since"), opt("until"), opt("text"))
        for bound in (f.since, f.until):
            if bound:
                try:
                    parse_time(bound)
                except ValueError:
                    raise FilterError(f"bad time {bound!r}: use 30m, 2h, 1d or an ISO time"
                                      ) from None
        return f

    def task_filter(self) -> TaskFilter:
        # one status is compared with '=' in where(): PostgreSQL (before 17) reads an index
        # in order only for '=', not for '= ANY(array)', and newest-first pages need that order
        return TaskFilter(status=self.status if len(self.status) > 1 else (),
                          route=self.route, key=self.key, since=self.since, until=self.until)

    def query(self) -> list[tuple[str, str]]:
        """The filter as query parameters (what links and forms carry)."""
        out = [("status", s) for s in self.status]
        out += [(k, v) for k, v in (("route", self.route), ("key", self.key),
                                    ("since", self.since), ("until", self.until),
                                    ("text", self.text)) if v]
        return out

    def urlencoded(self) -> str:
        return urlencode(self.query())

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "route": self.route, "key": self.key,
                "since": self.since, "until": self.until, "text": self.text}

    def where(self, *, before: int | None = None, extra: str | None = None,
              extra_params: tuple[Any, ...] = ()) -> tuple[sql.Composable, list[Any]]:
        """WHERE clause and parameters; ``extra`` is a fixed condition from this module (with
        ``extra_params`` for its placeholders)."""
        clauses: list[sql.Composable] = []
        params: list[Any] = []
        if len(self.status) == 1:
            clauses.append(sql.SQL("status = %s"))
            params.append(self.status[0])
        if self.text:
            clauses.append(sql.SQL("error ILIKE %s"))
            params.append("%" + _like_escape(self.text) + "%")
        if before is not None:
            clauses.append(sql.SQL("id < %s"))
            params.append(before)
        # "TRUE" makes the store's clause a WHERE we can extend with AND; the store puts its
        # own parameters first and the fixed conditions last
        base, base_params = self.task_filter().where(*([extra] if extra else []), "TRUE")
        base_params += list(extra_params)
        if not clauses:
            return base, base_params
        return base + sql.SQL(" AND ") + sql.SQL(" AND ").join(clauses), base_params + params


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass
class Page:
    rows: list[dict[str, Any]]
    next_before: int | None  # cursor of the next (older) page; None on the last page


def page(conn: psycopg.Connection[Any], f: ConsoleFilter, before: int | None = None,
         size: int = PAGE_SIZE) -> Page:
    """Newest first, ``size`` rows older than ``before`` (keyset paging: the 1000th page costs
    what the first does)."""
    where, params = f.where(before=before)
    query = sql.SQL("SELECT {} FROM dx.task{} ORDER BY id DESC LIMIT {}").format(
        sql.SQL(TaskStore.COLUMNS), where, size + 1)
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        rows = list(cur.fetchall())
    conn.commit()
    more = len(rows) > size
    rows = rows[:size]
    return Page(rows, int(rows[-1]["id"]) if more and rows else None)


#: What an operator action applies to (the task store's own rules for retry and skip).
ACTIONABLE = {"retry": "status IN ('dead', 'failed')",
              "skip": "status IN ('dead', 'failed', 'pending')"}


def count(conn: psycopg.Connection[Any], f: ConsoleFilter, action: str | None = None) -> int:
    """Tasks matching ``f`` (only those ``action`` applies to, when given)."""
    where, params = f.where(extra=ACTIONABLE[action] if action else None)
    row = conn.execute(sql.SQL("SELECT count(*) FROM dx.task{}").format(where),
                       params).fetchone()
    conn.commit()
    return int(row[0]) if row else 0


def lock_actionable(conn: psycopg.Connection[Any], f: ConsoleFilter, action: str,
                    ids: list[int] | None = None) -> list[int]:
    """Ids the action applies to, locked until the caller's transaction ends, so the audit rows
    written before the action name exactly the tasks it changes. Does not commit."""
    extra = ACTIONABLE[action] + (" AND id = ANY(%s)" if ids is not None else "")
    where, params = f.where(extra=extra, extra_params=(ids,) if ids is not None else ())
    rows = conn.execute(sql.SQL("SELECT id FROM dx.task{} ORDER BY id FOR UPDATE").format(where),
                        params).fetchall()
    return [int(r[0]) for r in rows]


def mapped_fields(conn: psycopg.Connection[Any], f: ConsoleFilter) -> list[str]:
    """The entity fields the route mapped, over every matching task that logged them."""
    where, params = f.where(extra="jsonb_typeof(import_log->'mapped') = 'object'")
    rows = conn.execute(
        sql.SQL("SELECT DISTINCT jsonb_object_keys(import_log->'mapped') FROM dx.task{}")
        .format(where), params).fetchall()
    return sorted(str(r[0]) for r in rows)


def csv_rows(conn: psycopg.Connection[Any], f: ConsoleFilter) -> Iterator[list[str]]:
    """The header, then one row per matching task (oldest first): task columns, the target's
    HTTP status, and ``data.<field>`` for each mapped field. Every text is masked like the
    logs (credentials a target echoed back never leave)."""
    fields = mapped_fields(conn, f)
    yield [*CSV_COLUMNS, *(f"data.{k}" for k in fields)]
    where, params = f.where()
    with conn.cursor(row_factory=dict_row, name="console_csv") as cur:
        cur.itersize = 2000
        cur.execute(sql.SQL(
            "SELECT {}, export_log->'status' AS http_status, import_log->'mapped' AS mapped "
            "FROM dx.task{} ORDER BY id").format(sql.SQL(TaskStore.COLUMNS), where), params)
        for r in cur:
            mapped = r["mapped"] if isinstance(r["mapped"], dict) else {}
            values = [r.get(c) for c in CSV_COLUMNS] + [mapped.get(k) for k in fields]
            yield [_cell(v) for v in values]
    conn.commit()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else \
        json.dumps(value, default=str) if isinstance(value, dict | list) else str(value)
    return redact(text)


def route_health(conn: psycopg.Connection[Any], window_s: float = 3600
                 ) -> dict[str, dict[str, Any]]:
    """Per route: failure rate over the last ``window_s`` (failed, retrying and dead among the
    tasks updated in it) and the newest error with its time."""
    out: dict[str, dict[str, Any]] = {}
    for route, bad, total in conn.execute(
            "SELECT route, count(*) FILTER (WHERE status IN ('dead', 'failed', 'retrying')), "
            "count(*) FROM dx.task WHERE updated_at > now() - make_interval(secs => %s) "
            "GROUP BY route", (window_s,)):
        out.setdefault(str(route), {})["failure_rate"] = int(bad) / int(total) if total else 0.0
    for route, error, at in conn.execute(
            "SELECT DISTINCT ON (route) route, error, updated_at FROM dx.task "
            "WHERE status IN ('dead', 'failed', 'retrying') AND error IS NOT NULL "
            "ORDER BY route, updated_at DESC"):
        out.setdefault(str(route), {}).update(last_error=redact(str(error)), last_error_at=at)
    conn.commit()
    return out
