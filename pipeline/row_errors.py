"""PostgreSQL's refusal of one row, told in words that never leak what the caller may not see.

PostgreSQL's own texts are not safe to pass on: a CHECK or NOT NULL violation says ``Failing
row contains (...)`` with *every* column of the row, a unique or foreign-key violation quotes
key columns and values, and a trigger's message can say anything. The API and source routes
expose only configured columns, so a client response, or a task log users export, must not
carry those texts. This module turns a row error into a stable code, the one column at fault
(only if the caller says it is exposed) and a message composed by dx from the code and exposed
names alone. The database's text is never copied.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

#: Maps a table column to the name the reader knows it by (an API field, a producer field), or
#: None when the column is not exposed to that reader.
Exposed = Callable[[str], str | None]

_KEY_DETAIL = re.compile(r"Key \(([^)]*)\)=")

_CODE_BY_STATE = {
    "23505": "duplicate",
    "23503": "foreign_key_violation",
    "23502": "null_not_allowed",
    "23514": "check_violation",
}

# data exceptions (class 22) by SQLSTATE: what the value did wrong, never the value itself
_DATA = {
    "22001": "the value is too long for its column",
    "22003": "the number is out of range for its column",
    "22007": "not a valid date or time",
    "22008": "the date or time is out of range",
    "22012": "division by zero while computing the row",
    "22021": "the text contains a character the database cannot store",
    "22P02": "not a valid value for its column's type",
    "22P05": "the text contains a character the database cannot store",
    "22023": "a value the database does not accept",
}


@dataclass(frozen=True)
class RowError:
    """A row refusal safe to show: ``code`` (the API's error codes), ``field`` (the exposed
    name of the one column at fault, if any) and a ``message`` composed by dx."""

    code: str
    field: str | None
    message: str


def is_row_error(err: psycopg.Error) -> bool:
    """Data and constraint errors (one row is at fault), as opposed to a broken connection."""
    state = err.sqlstate or ""
    return state.startswith(("22", "23")) or state in ("42804", "P0001")


def _columns(detail: str | None) -> list[str]:
    m = _KEY_DETAIL.search(detail or "")
    return [c.strip().strip('"') for c in m.group(1).split(",")] if m else []


def describe(err: psycopg.Error, exposed: Exposed) -> RowError:
    """``err`` (see :func:`is_row_error`) as a :class:`RowError` naming only exposed fields."""
    state = err.sqlstate or ""
    diag = err.diag
    code = _CODE_BY_STATE.get(state, "invalid_value")
    if state in ("23505", "23503"):
        cols = _columns(diag.message_detail)
        names = [exposed(c) for c in cols]
        shown = [n for n in names if n is not None]
        known = bool(cols) and len(shown) == len(cols)
        which = ", ".join(shown) if known else None
        field = shown[0] if known and len(shown) == 1 else None
        if state == "23505":
            msg = (f"another row already has this {which}" if which
                   else "another row already has these values (a unique rule of the database)")
        elif "still referenced" in (diag.message_detail or ""):
            msg = "other rows still refer to this row"
        else:
            msg = (f"{which} refers to a row that does not exist" if which
                   else "the row refers to a row that does not exist")
        return RowError(code, field, msg)
    if state == "23502":
        name = exposed(diag.column_name) if diag.column_name else None
        if name is not None:
            return RowError(code, name, f"{name} must not be null")
        return RowError(code, None, "a value the database requires is missing (a column "
                                    "that is not exposed has no default)")
    if state == "23514":
        return RowError(code, None, "the row breaks a check rule of the database")
    if state.startswith("23"):
        return RowError(code, None, "the row breaks a rule of the database")
    if state == "P0001":
        return RowError(code, None, "a trigger of the database refused the row")
    name = exposed(diag.column_name) if diag.column_name else None
    return RowError(code, name, _DATA.get(state, "a value the database cannot store"))


def log_text(err: psycopg.Error) -> str:
    """What operators' logs get: SQLSTATE, table and constraint, never the row's values."""
    diag = err.diag
    parts = [f"sqlstate {err.sqlstate}"]
    if diag.table_name:
        parts.append(f"table {diag.schema_name}.{diag.table_name}")
    if diag.constraint_name:
        parts.append(f"constraint {diag.constraint_name}")
    return ", ".join(parts)
