"""API entities managed from the operator console: stored in ``dx.api_entity``, served next to
the entities of dx.yaml (which stay read-only in the console; one name in both is refused).

Every ``dx api serve`` replica watches the table (:class:`Watcher`, one small query every
``interval_s``) and rebuilds its state when it changed, so a console edit reaches all replicas
within seconds, without a restart, and the OpenAPI document follows. A stored entity is checked
against the live catalog like one from the file when it is saved and again on every load; one
that no longer passes (its table dropped) stops the reload with the reason and the running state
stays, exactly like a bad dx.yaml on SIGHUP.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pipeline.config.api import ApiEntity
from pipeline.config.model import DxConfig
from pipeline.db import connect
from pipeline.errors import ConfigError

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
"""

#: What changes when any stored entity is added, changed or removed.
SIGNATURE = ("SELECT count(*) || ':' || coalesce(md5(string_agg(alias || '@' || updated_at, ',' "
             "ORDER BY alias)), '') FROM dx.api_entity")


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create ``dx.api_entity`` (idempotent; ``dx init`` calls it). Commits."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('dx.api_entity ensure_schema'))")
        conn.execute(DDL)


def _exists(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regclass('dx.api_entity') IS NOT NULL").fetchone()
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


def with_entities(config: DxConfig, extra: list[ApiEntity]) -> DxConfig:
    """``config`` serving ``extra`` after its own entities; a name in both is a ConfigError."""
    if not extra:
        return config
    mine = {e.alias for e in config.api.entities}
    clash = sorted(e.alias for e in extra if e.alias in mine)
    if clash:
        file, line = config.where("api", "entities")
        raise ConfigError(f"entity {', '.join(map(repr, clash))} is defined in {file} and in "
                          "the console (dx.api_entity); remove one", file=file, line=line)
    api = config.api.model_copy(update={"entities": [*config.api.entities, *extra]})
    return config.model_copy(update={"api": api})  # keeps the file and lines for errors


def with_stored(conn: psycopg.Connection[Any], config: DxConfig) -> DxConfig:
    return with_entities(config, stored(conn))


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
