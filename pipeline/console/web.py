"""What every console request shares: the database pool, who is calling (session cookie or
bearer token), role checks, CSRF checks and form parsing.

Authentication: a browser has a session cookie (HttpOnly, SameSite=Lax, Secure over TLS);
automation sends ``Authorization: Bearer <token>``. CSRF: every state-changing request made with
a session cookie must carry the session's CSRF token (the ``csrf`` form field, or the
``X-CSRF-Token`` header for JSON); bearer requests cannot be forged by another site (a browser
never adds the header by itself), so they need none.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import psycopg
from fastapi import HTTPException, Request

from pipeline.api.store import Pool
from pipeline.console import sessions
from pipeline.console.accounts import Principal, token_principal
from pipeline.console.actions import NEEDS


@dataclass(frozen=True)
class Caller:
    principal: Principal
    csrf: str | None  # the session's CSRF token; None for bearer tokens


class LoginRequired(Exception):
    """No valid session: pages redirect to the login page, the API answers 401."""


def pool(request: Request) -> Pool:
    return request.app.state.pool  # type: ignore[no-any-return]


def db(request: Request) -> Iterator[psycopg.Connection[Any]]:
    """One pooled connection for the request (FastAPI dependency)."""
    with pool(request).connection() as conn:
        # no prepared statements: a generic plan guesses an average status frequency and
        # walks the whole table for a rare one (a 1,000x slower page); custom plans see it
        conn.prepare_threshold = None
        yield conn


def caller(request: Request, conn: psycopg.Connection[Any]) -> Caller:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        who = token_principal(conn, auth[7:].strip())
        conn.commit()
        if who is None:
            raise HTTPException(401, "unknown or revoked token",
                                headers={"WWW-Authenticate": "Bearer"})
        return Caller(who, None)
    token = request.cookies.get(sessions.COOKIE)
    found = sessions.lookup(conn, token) if token else None
    if found is None:
        raise LoginRequired()
    return Caller(found.principal, found.csrf)


def need(c: Caller, action: str) -> None:
    """403 unless the caller's role allows ``action`` (see actions.NEEDS)."""
    role = NEEDS.get(action, action)
    if not c.principal.may(role):
        raise HTTPException(403, f"{action} needs the {role} role; "
                                 f"{c.principal.name} is {c.principal.role}")


def check_csrf(request: Request, c: Caller, fields: dict[str, str]) -> None:
    """403 unless a cookie-authenticated request carries its session's CSRF token."""
    if c.csrf is None:
        return
    sent = fields.get("csrf") or request.headers.get("x-csrf-token")
    if not sessions.same(sent, c.csrf):
        raise HTTPException(403, "missing or wrong CSRF token; reload the page and try again")


async def form_fields(request: Request) -> dict[str, str]:
    """The url-encoded body of a form post as a dict (last value wins) — FastAPI dependency.
    ``status`` may repeat; :func:`form_list` reads all of them."""
    body = (await request.body()).decode("utf-8", "replace")
    pairs = parse_qsl(body, keep_blank_values=True)
    request.state.form_pairs = pairs
    return dict(pairs)


def form_list(request: Request, name: str) -> list[str]:
    return [v for k, v in getattr(request.state, "form_pairs", []) if k == name]


def acting(request: Request, conn: psycopg.Connection[Any], fields: dict[str, str],
           action: str) -> Caller:
    """The caller of a state-changing request, after the CSRF and the role checks."""
    c = caller(request, conn)
    check_csrf(request, c, fields)
    need(c, action)
    return c
