"""The admin's page for operators and automation tokens (the same as ``dx console user`` and
``dx console token``), every change audited."""

from __future__ import annotations

from typing import Any

import psycopg
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from pipeline.console import accounts, audit
from pipeline.console.views import redirect_with, render
from pipeline.console.web import acting, caller, db, form_fields, need
from pipeline.errors import TerminalError

router = APIRouter(include_in_schema=False)


def _page(request: Request, conn: psycopg.Connection[Any], c: Any, status: int = 200,
          **ctx: Any) -> HTMLResponse:
    return render(request, "users.html", c, status_code=status, users=accounts.users(conn),
                  tokens=accounts.tokens(conn), trail=audit.entries(conn, "user"),
                  msg=request.query_params.get("msg"), **ctx)


@router.get("/users")
def users_page(request: Request, conn: psycopg.Connection[Any] = Depends(db)) -> HTMLResponse:
    c = caller(request, conn)
    need(c, "users")
    return _page(request, conn, c)


@router.post("/users/{action}")
def users_action(request: Request, action: str, fields: dict[str, str] = Depends(form_fields),
                 conn: psycopg.Connection[Any] = Depends(db)) -> Response:
    c = acting(request, conn, fields, "users")
    name, role = fields.get("name", "").strip(), fields.get("role", "viewer")
    who = c.principal.actor
    try:
        if action == "add":
            accounts.add_user(conn, name, role, fields.get("password", ""))
            done = f"user {name} added ({role})"
        elif action == "role":
            accounts.set_role(conn, name, role)
            done = f"user {name} is now {role}"
        elif action == "remove":
            if name == c.principal.name:
                raise TerminalError("you cannot remove yourself")
            accounts.remove_user(conn, name)
            done = f"user {name} removed"
        elif action == "token":
            secret = accounts.add_token(conn, name, role, created_by=who)
            audit.record(conn, who, "token add", "user", [f"token:{name}"], {"role": role})
            conn.commit()
            return _page(request, conn, c, 201, secret=secret, new_token=name)
        elif action == "revoke":
            accounts.revoke_token(conn, name)
            done = f"token {name} revoked"
        else:
            raise HTTPException(404, "no such action")
    except TerminalError as err:
        conn.rollback()
        return _page(request, conn, c, 422, error=str(err))
    subject = f"token:{name}" if action == "revoke" else name
    audit.record(conn, who, f"user {action}" if action != "revoke" else "token revoke", "user",
                 [subject], {"role": role} if action in ("add", "role") else None)
    conn.commit()
    return redirect_with("/users", done)
