"""Operator actions, shared by the pages and the JSON API: each one checks the caller's role,
does the task store's (or the pause module's) work and writes its audit rows in the same
transaction."""

from __future__ import annotations

from typing import Any

import psycopg

from pipeline.config import DxConfig
from pipeline.console import audit
from pipeline.console.accounts import Principal
from pipeline.routes.pause import RouteKindName, set_paused
from pipeline.tasks.query import lock_actionable
from pipeline.tasks.store import TaskFilter, TaskStore

#: The least role each action needs (checked on the server for every request).
NEEDS = {"retry": "operator", "skip": "operator", "pause": "operator", "resume": "operator",
         "users": "admin", "tokens": "admin", "entities": "admin"}


class Forbidden(Exception):
    """The caller's role does not allow the action (HTTP 403)."""


def require(who: Principal, action: str) -> None:
    need = NEEDS[action]
    if not who.may(need):
        raise Forbidden(f"{action} needs the {need} role; {who.name} is {who.role}")


def task_action(conn: psycopg.Connection[Any], who: Principal, action: str,
                f: TaskFilter, ids: list[int] | None = None) -> list[int]:
    """Retry or skip the tasks of ``f`` (narrowed to ``ids`` when given) that the action applies
    to; returns their ids. Audit rows and the change commit together."""
    require(who, action)
    try:
        locked = lock_actionable(conn, f, action, ids)  # opens the transaction
        detail: dict[str, Any] | None = None
        if ids is None:
            detail = {"filter": f.to_json(), "count": len(locked)}
        audit.record(conn, who.actor, action, "task", [str(i) for i in locked], detail)
        if not locked:
            conn.commit()
            return []
        # the store's retry()/skip() commit: the audit rows above commit with the change
        return _apply(conn, TaskStore(conn), action, locked, who)
    except BaseException:
        conn.rollback()
        raise


def _apply(conn: psycopg.Connection[Any], store: TaskStore, action: str, ids: list[int],
           who: Principal) -> list[int]:
    tf = TaskFilter(ids=ids)
    return store.retry(tf) if action == "retry" else store.skip(tf, f"skipped by {who.actor}")


class UnknownRoute(LookupError):
    """No route of that kind and name in dx.yaml (HTTP 404)."""


def pause_route(conn: psycopg.Connection[Any], who: Principal, cfg: DxConfig,
                kind: RouteKindName, route: str, paused: bool) -> bool:
    """Pause or resume a configured route; returns whether its state changed."""
    require(who, "pause" if paused else "resume")
    if route not in {r.name for r in (cfg.sinks if kind == "sink" else cfg.sources)}:
        raise UnknownRoute(f"no {kind} route {route!r} in the configuration")
    with conn.transaction():
        changed = set_paused(conn, kind, route, paused, who.actor)
        if changed:
            audit.record(conn, who.actor, "pause" if paused else "resume", "route",
                         [f"{kind}/{route}"])
    return changed
