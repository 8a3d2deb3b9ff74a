"""The console's tables in schema ``dx``: operators, their sessions, automation tokens, failed
logins (the rate limit) and the audit trail of every action."""

from __future__ import annotations

from typing import Any

import psycopg

ROLES = ("viewer", "operator", "admin")

DDL = """
CREATE SCHEMA IF NOT EXISTS dx;
CREATE TABLE IF NOT EXISTS dx.console_user (
    name          text PRIMARY KEY,
    role          text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS dx.console_session (
    token_hash text PRIMARY KEY,
    username   text NOT NULL REFERENCES dx.console_user (name) ON DELETE CASCADE,
    csrf       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS dx.console_token (
    name       text PRIMARY KEY,
    token_hash text NOT NULL UNIQUE,
    role       text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE TABLE IF NOT EXISTS dx.console_login_failure (
    username text NOT NULL,
    client   text,
    at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS console_login_failure_idx ON dx.console_login_failure (username, at);
CREATE TABLE IF NOT EXISTS dx.console_audit (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    actor        text NOT NULL,
    action       text NOT NULL,
    subject_kind text NOT NULL,
    subject      text NOT NULL,
    detail       jsonb
);
CREATE INDEX IF NOT EXISTS console_audit_subject_idx
    ON dx.console_audit (subject_kind, subject, id);
"""


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the console's tables (idempotent; ``dx init`` calls it). Commits."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('dx.console ensure_schema'))")
        conn.execute(DDL)
