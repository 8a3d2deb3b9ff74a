"""Applying a batch of validated inbound events to the target table, inside the caller's
transaction.

Why it is shaped like this:

* **One statement per batch, not per row.** Rows are staged with ``COPY`` into a session temp
  table and written with one ``INSERT ... SELECT ... ON CONFLICT DO UPDATE ... WHERE``. A
  row-by-row apply is ~10x slower (``bench/apply.py`` prints both).
* **Reduction by key, with sequential semantics.** ``ON CONFLICT`` cannot touch a row twice in
  one statement, so events of the same key are reduced first, exactly as applying them one by
  one would have ended: partial rows merge, a delete followed by an upsert deletes then
  re-inserts, and under a conflict policy each event is compared against the stored version
  (read ``FOR UPDATE``) and the versions before it, so every event gets its own outcome.
* **No-op writes are skipped** (``IS DISTINCT FROM``): re-applying an identical row neither
  writes nor fires capture, which makes a re-import or a third party echoing our own change back
  a no-op instead of a ping-pong. Under a conflict policy the version column does not count: a
  row that differs only in its version (a system that bumps it on every write it receives) is
  not written either, so it travels nowhere (README, "Two-way sync").
* **A row PostgreSQL rejects fails alone.** The batch runs in a savepoint; on a data or
  constraint error the key plans are bisected in nested savepoints until the failing key is
  found, its last event is failed with the reason (in dx's words: PostgreSQL's text can quote
  columns the route does not expose) and the key is re-planned without it.
  Keys that failed are retried once after everything else (a child row can need a parent that
  was in the other half). Nothing is partially applied: a key's plan lands whole or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pipeline.config.sources import SourceRoute
from pipeline.row_errors import describe, is_row_error
from pipeline.source.catalog import Target
from pipeline.source.events import Event, Failure

# Types without an equality operator: compared as text in the no-op guard.
_NO_EQUALITY = {"json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle"}

_STAGE = "_dx_stage"
_KEYS = "_dx_keys"
_GROUP = "_dx_grp"


@dataclass
class Plan:
    """What one key's events amount to: optionally delete the stored row first, then
    optionally upsert ``row``; ``events`` are the events that contributed (in order)."""

    key: tuple[Any, ...]
    events: list[Event] = field(default_factory=list)
    delete: bool = False
    row: dict[str, Any] | None = None
    conditional: bool = True  # upsert guarded by the stored version (no delete before it)


class RowRejected(Exception):
    """PostgreSQL refused one key's plan (raised only for a single-key attempt)."""


class Applier:
    """Applies batches for one route. Create it once per connection (it creates temp tables)."""

    def __init__(self, conn: psycopg.Connection[Any], route: SourceRoute, target: Target):
        self.conn = conn
        self.route = route
        self.target = target
        self.columns = list(target.columns)
        t = sql.Identifier(target.schema, target.table)
        self._table = t
        key_ids = [sql.Identifier(k) for k in target.key]
        self._key_list = sql.SQL(", ").join(key_ids)
        self._key_join = sql.SQL(" AND ").join(
            sql.SQL("t.{k} = k.{k}").format(k=k) for k in key_ids
        )
        with conn.cursor() as cur:
            cur.execute(sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "
                "SELECT {cols}, 0::int AS {grp} FROM {t} WITH NO DATA"
            ).format(stage=sql.Identifier(_STAGE), grp=sql.Identifier(_GROUP), t=t,
                     cols=sql.SQL(", ").join(map(sql.Identifier, self.columns))))
            cur.execute(sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS {keys} ON COMMIT DELETE ROWS AS "
                "SELECT {key} FROM {t} WITH NO DATA"
            ).format(keys=sql.Identifier(_KEYS), key=self._key_list, t=t))
        conn.commit()
        self._upsert_sql: dict[tuple[str, ...], sql.Composed] = {}
        self._sp = 0

    # ---- planning ---------------------------------------------------------------------------

    def _stored_rows(self, keys: Iterable[tuple[Any, ...]]) -> dict[tuple[Any, ...], Stored]:
        """Stored version and route columns of ``keys``, rows locked so nobody changes them
        under the plan."""
        version = self.target.version
        assert version is not None
        self._stage_keys(keys)
        q = sql.SQL("SELECT {tk}, t.{v}, {cols} FROM {t} t JOIN {keys} k ON {join} "
                    "FOR UPDATE OF t").format(
            tk=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(k))
                                  for k in self.target.key),
            v=sql.Identifier(version),
            cols=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c))
                                    for c in self.columns),
            t=self._table, keys=sql.Identifier(_KEYS), join=self._key_join)
        n = len(self.target.key)
        return {tuple(r[:n]): Stored(r[n], dict(zip(self.columns, r[n + 1:], strict=True)))
                for r in self.conn.execute(q)}

    def plan(self, events: Sequence[Event]) -> tuple[list[Plan], list[Failure]]:
        """Reduce events by key with the semantics of applying them one at a time."""
        by_key: dict[tuple[Any, ...], list[Event]] = {}
        for ev in events:
            by_key.setdefault(ev.key, []).append(ev)
        failures: list[Failure] = []
        stored: dict[tuple[Any, ...], Stored] = {}
        version = self.target.version
        if version is not None:
            upsert_keys = [k for k, evs in by_key.items() if any(e.op == "upsert" for e in evs)]
            if upsert_keys:
                stored = self._stored_rows(upsert_keys)
        plans = []
        mode = self.route.mode
        for key, evs in by_key.items():
            p = Plan(key)
            if mode == "insert":
                self._plan_insert(p, evs, failures)
            else:
                self._plan_upsert(p, evs, stored.get(key, _ABSENT) if version else _ABSENT,
                                  failures)
            if p.events:
                plans.append(p)
        return plans, failures

    def _plan_insert(self, p: Plan, evs: list[Event], failures: list[Failure]) -> None:
        first = evs[0]
        p.events.append(first)
        p.row = first.row
        for ev in evs[1:]:
            failures.append(self._fail(ev, "dead", "a row with this key already exists "
                                       f"(inserted by offset {first.message.offset})"))

    def _plan_upsert(self, p: Plan, evs: list[Event], stored: Any,
                     failures: list[Failure]) -> None:
        """Under a conflict policy each event is judged against the row as the events before
        it left it (``stored``: a :class:`Stored`, or _ABSENT): older loses; same values apart
        from the version change nothing (a duplicate, or an echo with a bumped version: not
        written, so it travels nowhere); an equal version with other values is a tie that
        ``conflict.ties`` decides."""
        version = self.target.version
        current: Any = _ABSENT if stored is _ABSENT else stored.version
        row: dict[str, Any] | None = None if stored is _ABSENT else dict(stored.row)
        for ev in evs:
            if ev.op == "delete":
                p.delete = True
                p.row = None
                p.conditional = False
                p.events.append(ev)
                current, row = _ABSENT, None
                continue
            assert ev.row is not None
            if version is not None and current is not _ABSENT and current is not None:
                skip = self._judge(ev.row, current, row)
                if skip is not None:
                    status, reason = skip
                    failures.append(self._fail(ev, status, reason, field=self._field(version)))
                    continue
            if version is not None:
                current = ev.row[version]
            row = dict(ev.row) if row is None else {**row, **ev.row}
            p.row = ev.row if p.row is None else {**p.row, **ev.row}
            p.events.append(ev)

    def _judge(self, incoming: dict[str, Any], current: Any,
               row: dict[str, Any] | None) -> tuple[str, str] | None:
        """Why an event does not apply against ``current``/``row`` (status, reason), or None."""
        version = self.target.version
        assert version is not None and self.route.conflict is not None
        v = incoming[version]
        if v < current:
            status = "dead" if self.route.conflict.policy == "reject-older" else "skipped"
            return status, f"version {v} is older than the current version {current}"
        if row is not None and self._same_content(incoming, row):
            if v == current:
                return "skipped", f"version {v} is already applied (duplicate)"
            return "skipped", (f"only the version changed ({current} -> {v}): an echo of the "
                               "stored row, not written")
        if v == current and self.route.conflict.ties == "stored":
            return "skipped", (f"version {v} is already applied with other values (a tie; "
                               "conflict.ties: stored keeps the stored row)")
        return None

    def _same_content(self, incoming: dict[str, Any], row: dict[str, Any]) -> bool:
        """Whether every column ``incoming`` carries, apart from key and version, already holds
        that value (conservative: a value it cannot compare counts as a change)."""
        skip = {*self.target.key, self.target.version}
        for c, value in incoming.items():
            if c in skip:
                continue
            if c not in row or not _equal(self.target.columns[c].type, value, row[c]):
                return False
        return True

    def _field(self, column: str) -> str:
        return self.route.field_for(column)

    def _exposed(self, column: str) -> str | None:
        """The producer field of a column the route writes; None for any other column."""
        return self._field(column) if column in self.target.columns else None

    def _fail(self, ev: Event, status: str, reason: str, field: str | None = None) -> Failure:
        return Failure(ev.message, status, reason, field, ev.key, ev.event_id)  # type: ignore[arg-type]

    # ---- execution --------------------------------------------------------------------------

    def apply(self, events: Sequence[Event]) -> list[Failure]:
        """Apply ``events`` in the caller's open transaction; return what did not apply."""
        plans, failures = self.plan(events)
        if not plans:
            return failures
        rejected: list[Plan] = []
        self._bisect(plans, rejected, failures, retry=True)
        if rejected:  # second chance once everything else is in (parents before children)
            again: list[Plan] = []
            self._bisect(rejected, again, failures, retry=False)
        return failures

    def _bisect(self, plans: list[Plan], rejected: list[Plan], failures: list[Failure],
                *, retry: bool) -> None:
        try:
            self._savepoint(lambda: self._execute(plans))
            return
        except RowRejected as err:
            cause = err.__cause__
            assert isinstance(cause, psycopg.Error)
            if len(plans) > 1:
                mid = len(plans) // 2
                self._bisect(plans[:mid], rejected, failures, retry=retry)
                self._bisect(plans[mid:], rejected, failures, retry=retry)
                return
            if retry:
                rejected.append(plans[0])
                return
            self._fail_last(plans[0], cause, failures)

    def _fail_last(self, plan: Plan, err: psycopg.Error, failures: list[Failure]) -> None:
        """Fail the plan's last event with why PostgreSQL refused it (in dx's words, naming
        only the route's columns: its task log is exported to people who may not see the
        others) and apply the rest of the key."""
        refused = describe(err, self._exposed)
        last = plan.events[-1]
        failures.append(self._fail(last, "dead", f"{refused.code}: {refused.message}",
                                   field=refused.field))
        rest = plan.events[:-1]
        if not rest:
            return
        stored = _ABSENT
        if self.target.version is not None:
            stored = self._stored_rows([plan.key]).get(plan.key, _ABSENT)
        again = Plan(plan.key)
        sub: list[Failure] = []
        if self.route.mode == "insert":
            self._plan_insert(again, rest, sub)
        else:
            self._plan_upsert(again, rest, stored, sub)
        failures.extend(sub)
        if again.events:
            self._bisect([again], [], failures, retry=False)

    def _savepoint(self, fn: Any) -> None:
        self._sp += 1
        name = sql.Identifier(f"dx_sp{self._sp}")
        self.conn.execute(sql.SQL("SAVEPOINT {}").format(name))
        try:
            fn()
        except psycopg.Error as err:
            if not is_row_error(err):
                raise
            self.conn.execute(sql.SQL("ROLLBACK TO SAVEPOINT {}").format(name))
            raise RowRejected(str(err)) from err
        self.conn.execute(sql.SQL("RELEASE SAVEPOINT {}").format(name))

    def _stage_keys(self, keys: Iterable[tuple[Any, ...]]) -> None:
        with self.conn.cursor() as cur:
            cur.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(_KEYS)))
            with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(
                    sql.Identifier(_KEYS), self._key_list)) as cp:
                for k in keys:
                    cp.write_row(k)

    def _execute(self, plans: list[Plan]) -> None:
        deletes = [p.key for p in plans if p.delete]
        upserts = [p for p in plans if p.row is not None]
        cur = self.conn.cursor()
        if deletes:
            self._stage_keys(deletes)
            cur.execute(sql.SQL("DELETE FROM {t} t USING {keys} k WHERE {join}").format(
                t=self._table, keys=sql.Identifier(_KEYS), join=self._key_join))
        if not upserts:
            return
        groups: dict[tuple[str, ...], int] = {}
        cur.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(_STAGE)))
        cols = self.columns
        with cur.copy(sql.SQL("COPY {} ({}, {}) FROM STDIN").format(
                sql.Identifier(_STAGE), sql.SQL(", ").join(map(sql.Identifier, cols)),
                sql.Identifier(_GROUP))) as cp:
            for p in upserts:
                row = p.row
                assert row is not None
                present = tuple(c for c in cols if c in row)
                g = groups.setdefault(present, len(groups))
                cp.write_row([row.get(c) for c in cols] + [g])
        for present, g in groups.items():
            cur.execute(self._upsert(present), (g,))

    def _upsert(self, present: tuple[str, ...]) -> sql.Composed:
        """INSERT ... ON CONFLICT for rows carrying ``present`` columns (cached per set)."""
        hit = self._upsert_sql.get(present)
        if hit is not None:
            return hit
        ids = [sql.Identifier(c) for c in present]
        col_list = sql.SQL(", ").join(ids)
        base = sql.SQL("INSERT INTO {t} AS t ({cols}) SELECT {cols} FROM {stage} "
                       "WHERE {grp} = %s ").format(t=self._table, cols=col_list,
                                                  stage=sql.Identifier(_STAGE),
                                                  grp=sql.Identifier(_GROUP))
        if self.route.mode == "insert":
            # A conflicting row is a failed insert, not a silent no-op: let PostgreSQL say so
            # (the unique violation fails that event alone through the bisection).
            q = sql.SQL("INSERT INTO {t} AS t ({cols}) SELECT {cols} FROM {stage} "
                        "WHERE {grp} = %s").format(t=self._table, cols=col_list,
                                                   stage=sql.Identifier(_STAGE),
                                                   grp=sql.Identifier(_GROUP))
            self._upsert_sql[present] = q
            return q
        settable = [c for c in present if c not in self.target.key]
        if not settable:
            q = base + sql.SQL("ON CONFLICT ({key}) DO NOTHING").format(key=self._key_list)
            self._upsert_sql[present] = q
            return q

        def side(prefix: str, c: str) -> sql.Composable:
            ref = sql.SQL(prefix + ".{}").format(sql.Identifier(c))
            if self.target.columns[c].type in _NO_EQUALITY:
                return sql.SQL("{}::text").format(ref)
            return ref

        def changed(cols: list[str]) -> sql.Composable:
            return sql.SQL("({}) IS DISTINCT FROM ({})").format(
                sql.SQL(", ").join(side("t", c) for c in cols),
                sql.SQL(", ").join(side("excluded", c) for c in cols))

        guard: sql.Composable = changed(settable)
        version = self.target.version
        if version is not None and version in present:
            # Content decides whether to write, the version whether the row may: a row whose
            # values equal the stored ones apart from the version is not written (an echo must
            # not travel on), and a tie writes only when dx yields on ties.
            content = [c for c in settable if c != version]
            tie = self.route.conflict is not None and self.route.conflict.ties == "incoming"
            guard = sql.SQL("{changed} AND (t.{v} IS NULL OR t.{v} {op} excluded.{v})").format(
                changed=changed(content or settable), v=sql.Identifier(version),
                op=sql.SQL("<=" if tie else "<"))
        q = base + sql.SQL("ON CONFLICT ({key}) DO UPDATE SET {sets} WHERE {guard}").format(
            key=self._key_list,
            sets=sql.SQL(", ").join(sql.SQL("{c} = excluded.{c}").format(c=sql.Identifier(c))
                                    for c in settable),
            guard=guard)
        self._upsert_sql[present] = q
        return q


@dataclass(frozen=True)
class Stored:
    """A stored row as the planner sees it: its version and the route's columns."""

    version: Any
    row: dict[str, Any]


def _equal(type_name: str, given: Any, stored: Any) -> bool:
    """``given`` (validated, JSON as text) equals ``stored`` (as psycopg returned it)."""
    if given == stored:
        return True
    if type_name in ("json", "jsonb") and isinstance(given, str):
        try:
            return bool(json.loads(given) == stored)
        except ValueError:
            return False
    return False


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT: Any = _Absent()
