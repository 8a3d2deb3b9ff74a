"""The console's pages (server-rendered HTML). Every page and form handler checks the caller on
the server: a hidden button is a convenience, the 403 is the rule."""

from __future__ import annotations

import csv
import io
import json
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from pipeline.console import accounts, audit, sessions
from pipeline.console.actions import pause_route, task_action
from pipeline.console.web import (
    Caller,
    caller,
    check_csrf,
    db,
    form_fields,
    form_list,
    need,
)
from pipeline.db import connection
from pipeline.observability.logging import redact
from pipeline.routes.pause import KINDS, RouteKindName, states
from pipeline.tasks.query import COUNT_CAP, count, csv_rows, page
from pipeline.tasks.store import STATUSES, FilterError, TaskFilter, TaskStore

router = APIRouter(include_in_schema=False)


def render(request: Request, template: str, c: Caller | None, status_code: int = 200,
           **ctx: Any) -> HTMLResponse:
    templates = request.app.state.templates
    return templates.TemplateResponse(  # type: ignore[no-any-return]
        request, template, {"me": c.principal if c else None, "csrf": c.csrf if c else None,
                        "statuses": STATUSES, **ctx}, status_code=status_code)


def _filter(request: Request) -> TaskFilter:
    try:
        return TaskFilter.from_params(request.query_params,
                                         request.query_params.getlist)
    except FilterError as err:
        raise HTTPException(400, str(err)) from None


def _form_filter(request: Request, fields: dict[str, str]) -> TaskFilter:
    try:
        return TaskFilter.from_params(fields, lambda n: form_list(request, n))
    except FilterError as err:
        raise HTTPException(400, str(err)) from None


def redirect_with(url: str, msg: str) -> RedirectResponse:
    sep = "&" if "?" in url else "?"
    return RedirectResponse(f"{url}{sep}{urlencode({'msg': msg})}", status_code=303)


# -- login ----------------------------------------------------------------------------------


@router.get("/login")
def login_page(request: Request, next: str = "/") -> HTMLResponse:
    token = secrets.token_urlsafe(24)
    resp = render(request, "login.html", None, login_csrf=token, next=_safe_next(next))
    _cookie(request, resp, sessions.LOGIN_CSRF_COOKIE, token, max_age=3600)
    return resp


@router.post("/login")
def login(request: Request, fields: dict[str, str] = Depends(form_fields),
          conn: psycopg.Connection[Any] = Depends(db)) -> Response:
    next_url = _safe_next(fields.get("next", "/"))
    if not sessions.same(fields.get("csrf"), request.cookies.get(sessions.LOGIN_CSRF_COOKIE)):
        raise HTTPException(403, "missing or wrong CSRF token; reload the login page")
    name, password = fields.get("name", "").strip(), fields.get("password", "")
    token = request.cookies.get(sessions.LOGIN_CSRF_COOKIE, "")

    def again(code: int, error: str) -> HTMLResponse:
        return render(request, "login.html", None, status_code=code, error=error,
                      login_csrf=token, next=next_url, name=name)

    if accounts.locked_out(conn, name):
        conn.commit()
        return again(429, f"too many failed logins for {name!r}; try again in "
                          f"{accounts.LOCKOUT_WINDOW_S // 60} minutes")
    who = accounts.authenticate(conn, name, password,
                                request.client.host if request.client else None)
    if who is None:
        return again(401, "wrong user name or password")
    resp = RedirectResponse(next_url, status_code=303)
    _cookie(request, resp, sessions.COOKIE, sessions.create(conn, who),
            max_age=sessions.TTL_S)
    resp.delete_cookie(sessions.LOGIN_CSRF_COOKIE)
    return resp


@router.post("/logout")
def logout(request: Request, fields: dict[str, str] = Depends(form_fields),
           conn: psycopg.Connection[Any] = Depends(db)) -> Response:
    c = caller(request, conn)
    check_csrf(request, c, fields)
    sessions.end(conn, request.cookies.get(sessions.COOKIE, ""))
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(sessions.COOKIE)
    return resp


def _safe_next(url: str) -> str:
    """Only a local path (no open redirect to another site)."""
    return url if url.startswith("/") and not url.startswith("//") else "/"


def _cookie(request: Request, resp: Response, name: str, value: str, max_age: int) -> None:
    resp.set_cookie(name, value, max_age=max_age, httponly=True, samesite="lax",
                    secure=request.url.scheme == "https", path="/")


# -- dashboard ------------------------------------------------------------------------------


@router.get("/")
def dashboard(request: Request, fragment: bool = False,
              conn: psycopg.Connection[Any] = Depends(db)) -> HTMLResponse:
    c = caller(request, conn)
    view = request.app.state.dashboard.view(conn)
    pauses = states(conn)
    conn.commit()
    return render(request, "dashboard_live.html" if fragment else "dashboard.html", c,
                  view=view, pauses=pauses, msg=request.query_params.get("msg"))


@router.post("/routes/{kind}/{route}/{action}")
def route_action(request: Request, kind: str, route: str, action: str,
                 fields: dict[str, str] = Depends(form_fields),
                 conn: psycopg.Connection[Any] = Depends(db)) -> Response:
    c = caller(request, conn)
    check_csrf(request, c, fields)
    if kind not in KINDS or action not in ("pause", "resume"):
        raise HTTPException(404, "no such route action")
    need(c, action)
    k: RouteKindName = "sink" if kind == "sink" else "source"
    changed = pause_route(conn, c.principal, request.app.state.dashboard.cfg, k, route,
                          action == "pause")
    request.app.state.dashboard.invalidate()
    verb = "paused" if action == "pause" else "resumed"
    return redirect_with("/", f"route {route} {verb}" if changed else f"route {route} was {verb}")


# -- tasks ----------------------------------------------------------------------------------


@router.get("/tasks")
def tasks_page(request: Request, before: int | None = None,
               conn: psycopg.Connection[Any] = Depends(db)) -> HTMLResponse:
    c = caller(request, conn)
    f = _filter(request)
    p = page(conn, f, before)
    matching = count(conn, f, cap=COUNT_CAP)
    routes = sorted({r.name for r in request.app.state.dashboard.cfg.sinks}
                    | {r.name for r in request.app.state.dashboard.cfg.sources})
    return render(request, "tasks.html", c, page=p, f=f, routes=routes,
                  matching=matching, cap=COUNT_CAP,
                  query=urlencode(f.query()), msg=request.query_params.get("msg"))


@router.get("/tasks.csv")
def tasks_csv(request: Request, conn: psycopg.Connection[Any] = Depends(db)) -> Response:
    """The filter as CSV, streamed from a connection of its own (an export of a million tasks
    neither sits in memory nor holds a pooled connection)."""
    caller(request, conn)
    f = _filter(request)
    url = request.app.state.dashboard.cfg.database.url.get_secret_value()

    def lines() -> Iterator[str]:
        buf = io.StringIO()
        w = csv.writer(buf)
        with connection(url, application_name="dx-console:csv") as own:
            for r in csv_rows(own, f):
                w.writerow(r)
                if buf.tell() > 65536:
                    yield buf.getvalue()
                    buf.seek(0)
                    buf.truncate()
        yield buf.getvalue()

    return StreamingResponse(lines(), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition":
                                      'attachment; filename="dx-tasks.csv"'})


@router.get("/tasks/{task_id}")
def task_page(request: Request, task_id: int,
              conn: psycopg.Connection[Any] = Depends(db)) -> HTMLResponse:
    c = caller(request, conn)
    row = TaskStore(conn).get(task_id)
    trail = audit.entries(conn, "task", str(task_id))
    if row is None:
        raise HTTPException(404, f"no task {task_id}")
    logs = {k: redact(json.dumps(row[k], indent=2, default=str)) if row[k] else None
            for k in ("import_log", "export_log")}
    export = row["export_log"] if isinstance(row.get("export_log"), dict) else None
    if export is not None:  # request and response as the text they were, masked
        export = {k: redact(v if isinstance(v, str) else json.dumps(v, indent=2, default=str))
                  if v is not None else None for k, v in export.items()}
    payload = None
    imp = row.get("import_log") or {}
    if isinstance(imp, dict) and imp.get("mapped") is not None:
        payload = redact(json.dumps(imp["mapped"], indent=2, default=str))
    return render(request, "task.html", c, t=row, logs=logs, export=export, payload=payload,
                  trail=trail,
                  raw_bytes=len(bytes(row["raw_value"])) if row.get("raw_value") else None,
                  error=redact(row["error"]) if row.get("error") else None,
                  msg=request.query_params.get("msg"))


@router.post("/tasks/{task_id}/{action}")
def task_one(request: Request, task_id: int, action: str,
             fields: dict[str, str] = Depends(form_fields),
             conn: psycopg.Connection[Any] = Depends(db)) -> Response:
    c = caller(request, conn)
    check_csrf(request, c, fields)
    if action not in ("retry", "skip"):
        raise HTTPException(404, "no such task action")
    need(c, action)
    done = task_action(conn, c.principal, action, TaskFilter(), [task_id])
    verb = "queued for retry" if action == "retry" else "skipped"
    return redirect_with(f"/tasks/{task_id}", f"task {task_id} {verb}" if done else
                 f"task {task_id} cannot be {'retried' if action == 'retry' else 'skipped'} "
                 "in its status")


@router.post("/tasks-bulk")
def tasks_bulk(request: Request, fields: dict[str, str] = Depends(form_fields),
               conn: psycopg.Connection[Any] = Depends(db)) -> Response:
    """Retry or skip every task of the filter: first a confirmation with the count, then the
    action (``confirm=yes``)."""
    c = caller(request, conn)
    check_csrf(request, c, fields)
    action = fields.get("action", "")
    if action not in ("retry", "skip"):
        raise HTTPException(400, "action must be retry or skip")
    need(c, action)
    f = _form_filter(request, fields)
    if fields.get("confirm") != "yes":
        n = count(conn, f, action)
        return render(request, "confirm.html", c, f=f, action=action, n=n,
                      query=urlencode(f.query()))
    done = task_action(conn, c.principal, action, f)
    verb = "queued for retry" if action == "retry" else "skipped"
    return redirect_with(f"/tasks?{urlencode(f.query())}", f"{len(done)} task(s) {verb}")


# -- audit ----------------------------------------------------------------------------------


@router.get("/audit")
def audit_page(request: Request, conn: psycopg.Connection[Any] = Depends(db)) -> HTMLResponse:
    c = caller(request, conn)
    return render(request, "audit.html", c, trail=audit.entries(conn, limit=500))


def login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
