"""API entities and API keys managed from the operator console: stored in ``dx.api_entity`` and
``dx.api_key``, served next to those of dx.yaml (which stay read-only in the console; one name in
both places is refused). A console key's secret is shown once when it is made; only its SHA-256
is stored (the same form as ``secret_sha256`` in dx.yaml); a revoked key stays listed, unusable.

Every ``dx api serve`` replica watches the table (:class:`Watcher`, one small query every
``interval_s``) and rebuilds its state when it changed, so a console edit reaches all replicas
within seconds, without a restart, and the OpenAPI document follows. A stored entity is checked
against the live catalog like one from the file when it is saved and again on every load; one
that no longer passes (its table dropped) stops the reload with the reason and the running state
stays, exactly like a bad dx.yaml on SIGHUP.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pipeline.api.security import hash_key
from pipeline.config.api import ApiEntity, ApiKey
from pipeline.config.model import DxConfig
from pipeline.db import connect
from pipeline.errors import ConfigError, ServiceUnavailable

log = logging.getLogger(__name__)

DDL = """
CREATE SCHEMA IF NOT EXISTS dx;
CREATE TABLE IF NOT EXISTS dx.api_entity (
    alias      text PRIMARY KEY,
    definition jsonb NOT NULL,
    updated_by text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE dx.api_entity IS
  'dx: Data Exchange API entities managed from the console (dx.yaml ones are not here)';
CREATE TABLE IF NOT EXISTS dx.api_key (
    id            text PRIMARY KEY,
    definition    jsonb NOT NULL,
    secret_sha256 text NOT NULL,
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    revoked_at    timestamptz
);
COMMENT ON TABLE dx.api_key IS
  'dx: Data Exchange API keys made in the console (secret never stored, only its SHA-256)';
"""

#: What changes when any stored entity or key is added, changed, revoked or removed.
SIGNATURE = ("SELECT (SELECT count(*) || ':' || coalesce(md5(string_agg(alias || '@' || "
             "updated_at, ',' ORDER BY alias)), '') FROM dx.api_entity) || '/' || "
             "(SELECT count(*) || ':' || coalesce(md5(string_agg(id || '@' || coalesce("
             "revoked_at, created_at), ',' ORDER BY id)), '') FROM dx.api_key)")


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create ``dx.api_entity`` (idempotent; ``dx init`` calls it). Commits."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('dx.api_entity ensure_schema'))")
        conn.execute(DDL)


def _exists(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regclass('dx.api_key') IS NOT NULL").fetchone()
    return bool(row and row[0])


def stored(conn: psycopg.Connection[Any]) -> list[ApiEntity]:
    """The stored entities by alias ([] before the table exists). A row that is no longer a valid
    entity (edited by hand) is a ConfigError naming it."""
    if not _exists(conn):
        return []
    out = []
    for alias, definition in conn.execute(
            "SELECT alias, definition FROM dx.api_entity ORDER BY alias"):
        try:
            out.append(ApiEntity.model_validate({**definition, "alias": alias}))
        except ValueError as err:
            raise ConfigError(f"entity {alias!r} stored in dx.api_entity is invalid: "
                              f"{str(err).splitlines()[0]}") from None
    return out


def signature(conn: psycopg.Connection[Any]) -> str:
    if not _exists(conn):
        return ""
    row = conn.execute(SIGNATURE).fetchone()
    return str(row[0]) if row else ""


def read_signature(url: str) -> str | None:
    """:func:`signature` over a short connection of its own; None when it cannot be read (the
    watcher then takes its first reading as the baseline)."""
    try:
        conn = connect(url, autocommit=True, application_name="dx-api:entities")
    except ServiceUnavailable:  # build_state reports it in its own words
        return None
    try:
        return signature(conn)
    except psycopg.Error:
        return None
    finally:
        conn.close()


def with_entities(config: DxConfig, extra: list[ApiEntity],
                  keys: list[ApiKey] | None = None) -> DxConfig:
    """``config`` serving ``extra`` after its own entities (and ``keys`` after its keys); a name
    in both is a ConfigError."""
    keys = keys or []
    if not extra and not keys:
        return config
    for what, mine, theirs, table in (
            ("entity", {e.alias for e in config.api.entities}, [e.alias for e in extra],
             "dx.api_entity"),
            ("api key", {k.id for k in config.api.keys}, [k.id for k in keys], "dx.api_key")):
        clash = sorted(n for n in theirs if n in mine)
        if clash:
            file, line = config.where("api")
            raise ConfigError(f"{what} {', '.join(map(repr, clash))} is defined in {file} and "
                              f"in the console ({table}); remove one", file=file, line=line)
    api = config.api.model_copy(update={"entities": [*config.api.entities, *extra],
                                        "keys": [*config.api.keys, *keys]})
    return config.model_copy(update={"api": api})  # keeps the file and lines for errors


def with_stored(conn: psycopg.Connection[Any], config: DxConfig) -> DxConfig:
    return with_entities(config, stored(conn), stored_keys(conn))


@dataclass(frozen=True)
class StoredKey:
    key: ApiKey
    created_by: str
    created_at: datetime
    revoked_at: datetime | None


def keys(conn: psycopg.Connection[Any]) -> list[StoredKey]:
    """Every console key, revoked ones too ([] before the table exists)."""
    if not _exists(conn):
        return []
    return [StoredKey(ApiKey.model_validate({**d, "id": i, "secret_sha256": h}), by, at, gone)
            for i, d, h, by, at, gone in conn.execute(
                "SELECT id, definition, secret_sha256, created_by, created_at, revoked_at "
                "FROM dx.api_key ORDER BY id")]


def stored_keys(conn: psycopg.Connection[Any]) -> list[ApiKey]:
    """The console keys that work (not revoked)."""
    return [k.key for k in keys(conn) if k.revoked_at is None]


def add_key(conn: psycopg.Connection[Any], key_id: str, system: str,
            scopes: dict[str, list[str]], who: str) -> str:
    """A new key; returns its secret (shown once). Validated like a dx.yaml key; an id in use
    (revoked ones too) is a ValueError. Does not commit."""
    secret = "dxk_" + secrets.token_urlsafe(32)
    key = ApiKey.model_validate({"id": key_id, "system": system, "scopes": scopes,
                                 "secret_sha256": hash_key(secret)})
    row = conn.execute(
        "INSERT INTO dx.api_key (id, definition, secret_sha256, created_by) "
        "VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING 1",
        (key.id, Jsonb({"system": key.system, "scopes": key.scopes}), key.secret_sha256,
         who)).fetchone()
    if row is None:
        raise ValueError(f"api key {key_id!r} exists (ids are never reused)")
    return secret


def revoke_key(conn: psycopg.Connection[Any], key_id: str) -> bool:
    """Does not commit."""
    return bool(conn.execute("UPDATE dx.api_key SET revoked_at = clock_timestamp() "
                             "WHERE id = %s AND revoked_at IS NULL", (key_id,)).rowcount)


def save(conn: psycopg.Connection[Any], entity: ApiEntity, who: str) -> bool:
    """Insert or replace; returns True when it was new. Does not commit."""
    definition = entity.model_dump(mode="json", exclude={"alias"}, exclude_defaults=True)
    row = conn.execute(
        "INSERT INTO dx.api_entity AS e (alias, definition, updated_by) VALUES (%s, %s, %s) "
        "ON CONFLICT (alias) DO UPDATE SET definition = EXCLUDED.definition, "
        "updated_by = EXCLUDED.updated_by, updated_at = clock_timestamp() "
        "RETURNING (xmax = 0)", (entity.alias, Jsonb(definition), who)).fetchone()
    return bool(row and row[0])


def delete(conn: psycopg.Connection[Any], alias: str) -> bool:
    """Does not commit."""
    return bool(conn.execute("DELETE FROM dx.api_entity WHERE alias = %s", (alias,)).rowcount)


class Watcher:
    """Calls ``on_change`` when the stored entities change (polled every ``interval_s`` from a
    daemon thread). A failed poll or a failed ``on_change`` is logged and retried next round."""

    def __init__(self, url: str, on_change: Callable[[], Any], interval_s: float = 2.0,
                 seen: str | None = None) -> None:
        self.url = url
        self.on_change = on_change
        self.interval_s = interval_s
        self.seen = seen
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dx-api-entities", daemon=True)

    def start(self) -> Watcher:
        self.thread.start()
        return self

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self.stop.wait(self.interval_s):
            try:
                if conn is None or conn.closed:
                    conn = connect(self.url, autocommit=True,
                                   application_name="dx-api:entities")
                now = signature(conn)
                if self.seen is None:
                    self.seen = now
                elif now != self.seen:
                    self.on_change()
                    self.seen = now
            except Exception as err:  # the next round tries again; the API keeps serving
                log.warning("api entities from the console not reloaded: %s", err)
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
