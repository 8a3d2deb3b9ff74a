"""The JSON management API: everything the pages do, for scripts (``/api/v1``; OpenAPI document
at ``/api/openapi.json``, Swagger UI at ``/api/docs``). Same roles as the pages; a bearer token
(``dx console token add``) or a session cookie plus the ``X-CSRF-Token`` header."""

from __future__ import annotations

import json
from typing import Any, Literal

import psycopg
from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field

from pipeline.console import audit, views
from pipeline.console.actions import pause_route, task_action
from pipeline.console.web import Caller, caller, check_csrf, db, need
from pipeline.observability.logging import redact
from pipeline.routes.pause import states
from pipeline.tasks.query import page
from pipeline.tasks.store import FilterError, TaskFilter, TaskStore

router = APIRouter(prefix="/api/v1", tags=["console"])


def who(request: Request, conn: psycopg.Connection[Any] = Depends(db)) -> Caller:
    return caller(request, conn)


class Filter(BaseModel):
    """Which tasks (all given conditions hold)."""

    status: list[str] = Field(default_factory=list, description="task statuses")
    route: str | None = None
    key: str | None = Field(None, description='entity key as stored, e.g. {"id":42}')
    since: str | None = Field(None, description="age (30m, 2h, 1d) or ISO time")
    until: str | None = None
    text: str | None = Field(None, description="part of the error message")

    def tasks(self) -> TaskFilter:
        try:
            return TaskFilter.from_params(self.model_dump())
        except FilterError as err:
            raise HTTPException(422, str(err)) from None


class ActionResult(BaseModel):
    count: int
    ids: list[int]


@router.get("/status", summary="dashboard: relay, routes, incidents")
def get_status(request: Request, c: Caller = Depends(who),
               conn: psycopg.Connection[Any] = Depends(db)) -> dict[str, Any]:
    return request.app.state.dashboard.view(conn).to_json()  # type: ignore[no-any-return]


@router.get("/tasks", summary="tasks, newest first (keyset paging with 'before')")
def list_tasks(request: Request, before: int | None = None, limit: int = 50,
               c: Caller = Depends(who),
               conn: psycopg.Connection[Any] = Depends(db)) -> dict[str, Any]:
    try:
        f = TaskFilter.from_params(request.query_params, request.query_params.getlist)
    except FilterError as err:
        raise HTTPException(422, str(err)) from None
    p = page(conn, f, before, size=max(1, min(limit, 500)))
    return {"tasks": [{**r, "error": redact(r["error"]) if r["error"] else None}
                      for r in p.rows], "next_before": p.next_before}


@router.get("/tasks/{task_id}", summary="one task with its logs and audit trail")
def get_task(task_id: int, c: Caller = Depends(who),
             conn: psycopg.Connection[Any] = Depends(db)) -> dict[str, Any]:
    row = TaskStore(conn).get(task_id)
    if row is None:
        raise HTTPException(404, f"no task {task_id}")
    out = {k: v for k, v in row.items() if k not in ("raw_key", "raw_value", "raw_headers")}
    out["error"] = redact(out["error"]) if out["error"] else None
    for k in ("import_log", "export_log"):
        if out[k] is not None:
            out[k] = json.loads(redact(json.dumps(out[k], default=str)))
    out["audit"] = audit.entries(conn, "task", str(task_id))
    return out


@router.post("/tasks/{task_id}/{action}", response_model=ActionResult,
             summary="retry or skip one task")
def act_one(request: Request, task_id: int, action: Literal["retry", "skip"],
            c: Caller = Depends(who),
            conn: psycopg.Connection[Any] = Depends(db)) -> ActionResult:
    check_csrf(request, c, {})
    need(c, action)
    done = task_action(conn, c.principal, action, TaskFilter(), [task_id])
    return ActionResult(count=len(done), ids=done)


@router.post("/tasks:{action}", response_model=ActionResult,
             summary="retry or skip every task of a filter")
def act_filter(request: Request, action: Literal["retry", "skip"], body: Filter,
               c: Caller = Depends(who),
               conn: psycopg.Connection[Any] = Depends(db)) -> ActionResult:
    check_csrf(request, c, {})
    need(c, action)
    done = task_action(conn, c.principal, action, body.tasks())
    return ActionResult(count=len(done), ids=done)


@router.get("/routes", summary="routes with their pause state")
def list_routes(request: Request, c: Caller = Depends(who),
                conn: psycopg.Connection[Any] = Depends(db)) -> list[dict[str, Any]]:
    cfg = request.app.state.dashboard.cfg
    found = states(conn)
    conn.commit()
    out = []
    for kind, names in (("sink", [r.name for r in cfg.sinks]),
                        ("source", [r.name for r in cfg.sources])):
        for name in names:
            s = found.get((kind, name))
            out.append({"kind": kind, "name": name, "paused": bool(s and s.paused),
                        "changed_by": s.changed_by if s else None,
                        "changed_at": s.changed_at if s else None})
    return out


@router.post("/routes/{kind}/{route}/{action}", summary="pause or resume a route")
def act_route(request: Request, kind: Literal["sink", "source"], route: str,
              action: Literal["pause", "resume"], c: Caller = Depends(who),
              conn: psycopg.Connection[Any] = Depends(db)) -> dict[str, Any]:
    check_csrf(request, c, {})
    need(c, action)
    changed = pause_route(conn, c.principal, request.app.state.dashboard.cfg, kind, route,
                          action == "pause")
    request.app.state.dashboard.invalidate()
    return {"kind": kind, "route": route, "paused": action == "pause", "changed": changed}


@router.get("/audit", summary="the audit trail, newest first")
def get_audit(subject_kind: str | None = None, subject: str | None = None, limit: int = 100,
              c: Caller = Depends(who),
              conn: psycopg.Connection[Any] = Depends(db)) -> list[dict[str, Any]]:
    return audit.entries(conn, subject_kind, subject, max(1, min(limit, 1000)))


router.add_api_route("/tasks.csv", views.tasks_csv, methods=["GET"],
                     summary="the tasks of a filter as CSV (task columns, data.<field> columns, "
                             "masked); same query parameters as /tasks")
