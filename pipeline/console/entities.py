"""Data Exchange API entities from the console: check a definition like ``dx api check`` does
(the model's rules, then the live catalog together with every other entity), store it in
``dx.api_entity`` with its audit row, or remove it. dx.yaml's entities are read-only here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
import yaml
from pydantic import ValidationError

from pipeline.api import managed
from pipeline.api.catalog import check_references, load_entities
from pipeline.config.api import ApiEntity
from pipeline.config.model import DxConfig
from pipeline.console import audit
from pipeline.console.accounts import Principal
from pipeline.console.actions import require
from pipeline.errors import ConfigError


@dataclass
class Listed:
    entity: ApiEntity
    managed_by: str  # 'dx.yaml' or 'console'


@dataclass
class Problem:
    where: str  # the field path ('fields.sku.max_length') or '' for the whole entity
    message: str


def listing(conn: psycopg.Connection[Any], cfg: DxConfig) -> list[Listed]:
    out = [Listed(e, "dx.yaml") for e in cfg.api.entities]
    out += [Listed(e, "console") for e in managed.stored(conn)]
    conn.commit()
    return sorted(out, key=lambda x: x.entity.alias)


def as_yaml(entity: ApiEntity) -> str:
    data = entity.model_dump(mode="json", exclude={"alias"}, exclude_defaults=True)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def check(conn: psycopg.Connection[Any], cfg: DxConfig, alias: str,
          text: str) -> tuple[ApiEntity | None, list[Problem]]:
    """The entity the YAML ``text`` defines under ``alias``, or the problems (each with the
    path of the field it is about)."""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as err:
        return None, [Problem("", f"not YAML: {str(err).splitlines()[0]}")]
    if not isinstance(data, dict):
        return None, [Problem("", "the definition is a mapping (table:, fields:, ...)")]
    try:
        entity = ApiEntity.model_validate({**data, "alias": alias})
    except ValidationError as err:
        return None, [Problem(".".join(str(p) for p in e["loc"]), e["msg"])
                      for e in err.errors()]
    if any(e.alias == alias for e in cfg.api.entities):
        return None, [Problem("alias", f"{alias!r} is defined in dx.yaml (read-only here)")]
    others = [e for e in managed.stored(conn) if e.alias != alias]
    try:
        load_entities(conn, managed.with_entities(cfg, [*others, entity]))
    except ConfigError as err:
        return None, [Problem("", _bare(err))]
    finally:
        conn.rollback()
    return entity, []


def _bare(err: ConfigError) -> str:
    """The message without dx.yaml's file:line (the entity is not in the file)."""
    text = str(err)
    if err.file is not None:
        prefix = f"{err.file}:{err.line}: " if err.line is not None else f"{err.file}: "
        text = text.removeprefix(prefix)
    return text


def save(conn: psycopg.Connection[Any], who: Principal, entity: ApiEntity) -> bool:
    """Store (after :func:`check`) with its audit row; returns True when new."""
    require(who, "entities")
    created = managed.save(conn, entity, who.actor)
    audit.record(conn, who.actor, "entity create" if created else "entity update", "entity",
                 [entity.alias], {"definition": entity.model_dump(
                     mode="json", exclude={"alias"}, exclude_defaults=True)})
    conn.commit()
    return created


def remove(conn: psycopg.Connection[Any], who: Principal, alias: str) -> bool:
    require(who, "entities")
    gone = managed.delete(conn, alias)
    if gone:
        audit.record(conn, who.actor, "entity delete", "entity", [alias])
    conn.commit()
    return gone


# -- API keys -----------------------------------------------------------------------------------


def key_listing(conn: psycopg.Connection[Any], cfg: DxConfig) -> list[dict[str, Any]]:
    """dx.yaml's keys (read-only) and the console's, revoked ones too."""
    out: list[dict[str, Any]] = [
        {"id": k.id, "system": k.system, "scopes": k.scopes, "managed_by": "dx.yaml",
         "created_by": None, "created_at": None, "revoked_at": None} for k in cfg.api.keys]
    out += [{"id": s.key.id, "system": s.key.system, "scopes": s.key.scopes,
             "managed_by": "console", "created_by": s.created_by, "created_at": s.created_at,
             "revoked_at": s.revoked_at} for s in managed.keys(conn)]
    conn.commit()
    return sorted(out, key=lambda k: str(k["id"]))


def parse_scopes(text: str) -> dict[str, list[str]]:
    """``brands: read, write`` lines (``*`` for every entity) as the scopes mapping."""
    out: dict[str, list[str]] = {}
    for line in text.replace(";", "\n").splitlines():
        if not line.strip():
            continue
        alias, sep, rest = line.partition(":")
        if not sep:
            raise ValueError(f"scope line {line.strip()!r}: write 'entity: read, write'")
        out[alias.strip()] = [s.strip() for s in rest.split(",") if s.strip()]
    return out


def create_key(conn: psycopg.Connection[Any], who: Principal, cfg: DxConfig, key_id: str,
               system: str, scopes_text: str) -> tuple[str | None, list[Problem]]:
    """A new API key; returns its secret (shown once) or the problems."""
    require(who, "entities")
    if any(k.id == key_id for k in cfg.api.keys):
        return None, [Problem("id", f"{key_id!r} is a key of dx.yaml")]
    try:
        scopes = parse_scopes(scopes_text)
        secret = managed.add_key(conn, key_id, system, scopes, who.actor)
    except ValidationError as err:
        conn.rollback()
        return None, [Problem(".".join(str(p) for p in e["loc"]), e["msg"])
                      for e in err.errors()]
    except ValueError as err:
        conn.rollback()
        return None, [Problem("", str(err))]
    try:  # the scopes must name entities the API serves
        check_references(managed.with_stored(conn, cfg))
    except ConfigError as err:
        conn.rollback()
        return None, [Problem("scopes", _bare(err))]
    audit.record(conn, who.actor, "key create", "key", [key_id],
                 {"system": system, "scopes": scopes})
    conn.commit()
    return secret, []


def revoke_key(conn: psycopg.Connection[Any], who: Principal, key_id: str) -> bool:
    require(who, "entities")
    gone = managed.revoke_key(conn, key_id)
    if gone:
        audit.record(conn, who.actor, "key revoke", "key", [key_id])
    conn.commit()
    return gone
