"""Operators and automation tokens: who may use the console, with which role.

Passwords are hashed with Argon2id (argon2-cffi's defaults, re-hashed on login when the defaults
change); tokens are 256-bit random secrets, so a SHA-256 of them is enough to store (they cannot
be guessed from a dictionary) and lets a lookup use an index. Secrets are shown once, never
stored or logged in clear.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from pipeline.console.schema import ROLES
from pipeline.errors import TerminalError

HASHER = PasswordHasher()
#: Failed logins of one user name within :data:`LOCKOUT_WINDOW_S` before logins are refused.
MAX_FAILURES = 5
LOCKOUT_WINDOW_S = 15 * 60
MIN_PASSWORD = 8
#: A hash to verify against when the user does not exist, so a wrong name costs as much time
#: as a wrong password (no user enumeration by timing).
_DUMMY_HASH = HASHER.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class Principal:
    """Who is calling: an operator (session) or an automation token (bearer)."""

    name: str
    role: str
    via: str  # 'session' or 'token'

    @property
    def actor(self) -> str:
        """The name the audit trail records."""
        return self.name if self.via == "session" else f"token:{self.name}"

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_role(role: str) -> str:
    if role not in ROLES:
        raise TerminalError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise TerminalError(f"password too short: at least {MIN_PASSWORD} characters")
    return password


def add_user(conn: psycopg.Connection[Any], name: str, role: str, password: str) -> None:
    if not name.strip() or len(name) > 100:
        raise TerminalError("user name must be 1-100 characters")
    check_role(role)
    row = conn.execute(
        "INSERT INTO dx.console_user (name, role, password_hash) VALUES (%s, %s, %s) "
        "ON CONFLICT (name) DO NOTHING RETURNING 1",
        (name, role, HASHER.hash(check_password(password)))).fetchone()
    if row is None:
        raise TerminalError(f"user {name!r} exists; change it with 'dx console user passwd'")


def set_password(conn: psycopg.Connection[Any], name: str, password: str,
                 role: str | None = None) -> None:
    """New password (and role, when given); ends the user's sessions."""
    if role is not None:
        check_role(role)
    n = conn.execute(
        "UPDATE dx.console_user SET password_hash = %s, role = coalesce(%s, role), "
        "updated_at = now() WHERE name = %s",
        (HASHER.hash(check_password(password)), role, name)).rowcount
    if not n:
        raise TerminalError(f"no user {name!r}")
    conn.execute("DELETE FROM dx.console_session WHERE username = %s", (name,))


def set_role(conn: psycopg.Connection[Any], name: str, role: str) -> None:
    """A new role; the user's sessions end (they log in again with it)."""
    check_role(role)
    if not conn.execute("UPDATE dx.console_user SET role = %s, updated_at = now() "
                        "WHERE name = %s", (role, name)).rowcount:
        raise TerminalError(f"no user {name!r}")
    conn.execute("DELETE FROM dx.console_session WHERE username = %s", (name,))


def remove_user(conn: psycopg.Connection[Any], name: str) -> None:
    if not conn.execute("DELETE FROM dx.console_user WHERE name = %s", (name,)).rowcount:
        raise TerminalError(f"no user {name!r}")


def users(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return [(str(n), str(r)) for n, r in
            conn.execute("SELECT name, role FROM dx.console_user ORDER BY name")]


def tokens(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT name, role, created_by, created_at, revoked_at "
                        "FROM dx.console_token ORDER BY name").fetchall()
    return [{"name": n, "role": r, "created_by": b, "created_at": c, "revoked_at": v}
            for n, r, b, c, v in rows]


def locked_out(conn: psycopg.Connection[Any], name: str) -> bool:
    """Whether ``name`` had :data:`MAX_FAILURES` failed logins within the window."""
    row = conn.execute(
        "SELECT count(*) FROM dx.console_login_failure WHERE username = %s "
        "AND at > now() - make_interval(secs => %s)", (name, LOCKOUT_WINDOW_S)).fetchone()
    return bool(row and int(row[0]) >= MAX_FAILURES)


def authenticate(conn: psycopg.Connection[Any], name: str, password: str,
                 client: str | None) -> Principal | None:
    """The operator when the password is right; None otherwise (the failure is counted).
    The caller checks :func:`locked_out` first. Commits."""
    row = conn.execute("SELECT role, password_hash FROM dx.console_user WHERE name = %s",
                       (name,)).fetchone()
    stored = str(row[1]) if row else _DUMMY_HASH
    try:
        ok = HASHER.verify(stored, password) and row is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        ok = False
    if not ok or row is None:
        conn.execute("INSERT INTO dx.console_login_failure (username, client) VALUES (%s, %s)",
                     (name[:200], client))
        conn.execute("DELETE FROM dx.console_login_failure "
                     "WHERE at < now() - make_interval(secs => %s)", (LOCKOUT_WINDOW_S * 4,))
        conn.commit()
        return None
    if HASHER.check_needs_rehash(stored):
        conn.execute("UPDATE dx.console_user SET password_hash = %s WHERE name = %s",
                     (HASHER.hash(password), name))
    conn.execute("DELETE FROM dx.console_login_failure WHERE username = %s", (name,))
    conn.commit()
    return Principal(name, str(row[0]), "session")


def add_token(conn: psycopg.Connection[Any], name: str, role: str, created_by: str) -> str:
    """A new automation token; returns its secret (shown once, only its hash is kept)."""
    check_role(role)
    secret = "dxc_" + secrets.token_urlsafe(32)
    row = conn.execute(
        "INSERT INTO dx.console_token (name, token_hash, role, created_by) "
        "VALUES (%s, %s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING 1",
        (name, sha256(secret), role, created_by)).fetchone()
    if row is None:
        raise TerminalError(f"token {name!r} exists; revoke it first")
    return secret


def revoke_token(conn: psycopg.Connection[Any], name: str) -> None:
    if not conn.execute("UPDATE dx.console_token SET revoked_at = now() "
                        "WHERE name = %s AND revoked_at IS NULL", (name,)).rowcount:
        raise TerminalError(f"no active token {name!r}")


def token_principal(conn: psycopg.Connection[Any], secret: str) -> Principal | None:
    row = conn.execute("SELECT name, role FROM dx.console_token WHERE token_hash = %s "
                       "AND revoked_at IS NULL", (sha256(secret),)).fetchone()
    return Principal(str(row[0]), str(row[1]), "token") if row else None
