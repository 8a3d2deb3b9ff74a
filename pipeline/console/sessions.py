"""Login sessions: a random cookie value (only its SHA-256 is stored), a CSRF token per session,
and an expiry. Stored in the database so every console replica accepts every session and a
password change or user removal ends them at once."""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any

import psycopg

from pipeline.console.accounts import Principal, sha256

COOKIE = "dx_session"
LOGIN_CSRF_COOKIE = "dx_login_csrf"
TTL_S = 12 * 3600


@dataclass(frozen=True)
class Session:
    principal: Principal
    csrf: str


def create(conn: psycopg.Connection[Any], principal: Principal) -> str:
    """A new session for ``principal``; returns the cookie value. Commits."""
    token = secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO dx.console_session (token_hash, username, csrf, expires_at) "
        "VALUES (%s, %s, %s, now() + make_interval(secs => %s))",
        (sha256(token), principal.name, secrets.token_urlsafe(32), TTL_S))
    conn.execute("DELETE FROM dx.console_session WHERE expires_at < now()")
    conn.commit()
    return token


def lookup(conn: psycopg.Connection[Any], token: str) -> Session | None:
    row = conn.execute(
        "SELECT u.name, u.role, s.csrf FROM dx.console_session s "
        "JOIN dx.console_user u ON u.name = s.username "
        "WHERE s.token_hash = %s AND s.expires_at > now()", (sha256(token),)).fetchone()
    conn.commit()
    if row is None:
        return None
    return Session(Principal(str(row[0]), str(row[1]), "session"), str(row[2]))


def end(conn: psycopg.Connection[Any], token: str) -> None:
    conn.execute("DELETE FROM dx.console_session WHERE token_hash = %s", (sha256(token),))
    conn.commit()


def same(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two tokens; a missing one never matches."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))
