"""Task reads for people (the console's pages and JSON API, ``dx tasks``): newest-first pages
with a keyset cursor, capped counts, the CSV export with the entity's mapped fields, the rows an
operator action applies to, and per-route counts and health for the dashboard and ``dx status``.

Every one of them takes a :class:`~pipeline.tasks.store.TaskFilter`, so a filter means the same
in the console and the CLI. They are shaped for a task table of millions of rows: no page reads
more than its rows from an index (keyset paging, never OFFSET), and no count scans the table
(counts stop at a cap, or come from the planner's statistics, and say so).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pipeline.observability.logging import redact
from pipeline.tasks.store import STATUSES, UNRESOLVED, TaskFilter, TaskStore

PAGE_SIZE = 50
#: where a count of matching tasks stops ("1,000+"): counting further reads that many rows
COUNT_CAP = 1000
#: per route and resolved status, the dashboard counts exactly up to this, then estimates
EXACT_UP_TO = 1000
RESOLVED = tuple(s for s in STATUSES if s not in UNRESOLVED)
#: Task columns of the CSV, before the entity's mapped fields (``data.<field>``).
CSV_COLUMNS = ("id", "route", "status", "attempts", "key", "op", "event_id", "topic",
               "partition", "offset", "error", "http_status", "created_at", "updated_at")
@dataclass
class Page:
    rows: list[dict[str, Any]]
    next_before: int | None  # cursor of the next (older) page; None on the last page


def page(conn: psycopg.Connection[Any], f: TaskFilter, before: int | None = None,
         size: int = PAGE_SIZE) -> Page:
    """Newest first, ``size`` rows older than ``before`` (keyset paging: the 1000th page costs
    what the first does)."""
    where, params = f.where(before=before)
    if len(f.status) > 1 and not f.ids:
        # several statuses: one ordered index scan per status, merged (Merge Append), instead of
        # sorting every task of those statuses for one page
        parts, params = [], []
        for s in f.status:
            w, p = replace(f, status=[s]).where(before=before)
            parts.append(sql.SQL("(SELECT {} FROM dx.task{} ORDER BY id DESC LIMIT {})").format(
                sql.SQL(TaskStore.COLUMNS), w, size + 1))
            params += p
        query: sql.Composed = sql.SQL("SELECT * FROM ({}) t ORDER BY id DESC LIMIT {}").format(
            sql.SQL(" UNION ALL ").join(parts), size + 1)
    else:
        query = sql.SQL("SELECT {} FROM dx.task{} ORDER BY id DESC LIMIT {}").format(
            sql.SQL(TaskStore.COLUMNS), where, size + 1)
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        rows = list(cur.fetchall())
    conn.commit()
    more = len(rows) > size
    rows = rows[:size]
    return Page(rows, int(rows[-1]["id"]) if more and rows else None)


def count(conn: psycopg.Connection[Any], f: TaskFilter, action: str | None = None,
          cap: int | None = None) -> int:
    """Tasks matching ``f`` (only those ``action`` applies to, when given); with ``cap``, stops
    at ``cap + 1`` ("more than cap") instead of counting every match."""
    narrowed = f.for_action(action) if action else f
    if narrowed is None:
        return 0
    where, params = narrowed.where()
    inner = sql.SQL("SELECT 1 FROM dx.task{}").format(where)
    if cap is not None:
        inner = inner + sql.SQL(" LIMIT {}").format(cap + 1)
    row = conn.execute(sql.SQL("SELECT count(*) FROM ({}) m").format(inner),
                       params).fetchone()
    conn.commit()
    return int(row[0]) if row else 0


def lock_actionable(conn: psycopg.Connection[Any], f: TaskFilter, action: str,
                    ids: list[int] | None = None) -> list[int]:
    """Ids the action applies to, locked until the caller's transaction ends, so the audit rows
    written before the action name exactly the tasks it changes. Does not commit."""
    narrowed = (replace(f, ids=ids or [-1]) if ids is not None else f).for_action(action)
    if narrowed is None:
        return []
    where, params = narrowed.where()
    rows = conn.execute(sql.SQL("SELECT id FROM dx.task{} ORDER BY id FOR UPDATE").format(where),
                        params).fetchall()
    return [int(r[0]) for r in rows]


def mapped_fields(conn: psycopg.Connection[Any], f: TaskFilter) -> list[str]:
    """The entity fields the route mapped, over every matching task that logged them."""
    where, params = f.where("jsonb_typeof(import_log->'mapped') = 'object'")
    rows = conn.execute(
        sql.SQL("SELECT DISTINCT jsonb_object_keys(import_log->'mapped') FROM dx.task{}")
        .format(where), params).fetchall()
    return sorted(str(r[0]) for r in rows)


def csv_rows(conn: psycopg.Connection[Any], f: TaskFilter) -> Iterator[list[str]]:
    """The header, then one row per matching task (oldest first): task columns, the target's
    HTTP status, and ``data.<field>`` for each mapped field. Every text is masked like the
    logs (credentials a target echoed back never leave)."""
    fields = mapped_fields(conn, f)
    yield [*CSV_COLUMNS, *(f"data.{k}" for k in fields)]
    where, params = f.where()
    with conn.cursor(row_factory=dict_row, name="dx_tasks_csv") as cur:
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


# -- the dashboard and dx status -------------------------------------------------------------


@dataclass
class Counts:
    """Tasks by route and status. Unresolved statuses (the ones an operator acts on) are
    exact; a resolved status past EXACT_UP_TO tasks of a route is the planner's estimate
    (``estimated`` names those), so the dashboard never counts a million rows per refresh."""

    by_route: dict[str, dict[str, int]] = field(default_factory=dict)
    estimated: set[tuple[str, str]] = field(default_factory=set)


def counts(conn: psycopg.Connection[Any], exact_up_to: int = EXACT_UP_TO) -> Counts:
    store = TaskStore(conn)
    out = Counts(store.counts_by_route())
    for route, found in store.counts_by_route(RESOLVED, cap=exact_up_to).items():
        for status, n in found.items():
            if n > exact_up_to:
                n = max(n, _estimate(conn, route, status))
                out.estimated.add((route, status))
            out.by_route.setdefault(route, {})[status] = n
    conn.commit()
    return out


def _estimate(conn: psycopg.Connection[Any], route: str, status: str) -> int:
    """The planner's row estimate (statistics on (route, status): dx.task_route_status_stats)."""
    row = conn.execute("EXPLAIN (FORMAT JSON) SELECT 1 FROM dx.task WHERE route = %s "
                       "AND status = %s", (route, status)).fetchone()
    return int(row[0][0]["Plan"]["Plan Rows"]) if row else 0


def last_errors(conn: psycopg.Connection[Any], route_names: Sequence[str]
                ) -> dict[str, tuple[str, Any]]:
    """Per route: the newest error of a failing task and its time (one index probe per route
    and failing status, on (route, status, updated_at))."""
    out: dict[str, tuple[str, Any]] = {}
    for route, error, at in conn.execute(
            "SELECT DISTINCT ON (r) r, e.error, e.updated_at FROM unnest(%s::text[]) r "
            "CROSS JOIN unnest(ARRAY['dead', 'failed', 'retrying']) s CROSS JOIN LATERAL "
            "(SELECT error, updated_at FROM dx.task WHERE route = r AND status = s "
            "AND error IS NOT NULL ORDER BY updated_at DESC LIMIT 1) e "
            "ORDER BY r, e.updated_at DESC", (list(route_names),)):
        out[str(route)] = (redact(str(error)), at)
    conn.commit()
    return out
