"""The OpenAPI 3.1 document of the API, generated from the runtime entities (so it changes with
dx.yaml on reload). Field schemas carry the column's JSON type, nullability and format, plus the
dx.yaml rules (minLength/maxLength, minimum/maximum, pattern, enum); request schemas forbid
additional properties, as the API does."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.api.catalog import Entity, Field
from pipeline.api.query import MAX_OFFSET, OPS, filterable, render

TRANSACTION_HEADER = "X-Dx-Transaction"

_FORMATS = {"int2": "int32", "int4": "int32", "int8": "int64", "uuid": "uuid",
            "timestamp": "date-time", "timestamptz": "date-time", "date": "date", "time": "time",
            "float4": "float", "float8": "double", "numeric": "decimal", "bytea": "byte"}
_ERROR_STATUSES = ("400", "401", "403", "404", "405", "409", "413", "422", "429", "503")
_RANGE_TYPES = {"int2", "int4", "int8", "numeric", "float4", "float8", "date", "timestamp",
                "timestamptz", "time", "text", "varchar", "bpchar", "citext"}


def _schema_name(alias: str, suffix: str = "") -> str:
    return "".join(part.capitalize() for part in alias.split("_")) + suffix


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _scalar(f: Field, *, element: bool = False, rules: bool = True) -> dict[str, Any]:
    col = f.column
    kind = f.element_kind if element else f.kind
    out: dict[str, Any] = {} if kind == "any" else {"type": kind}
    fmt = _FORMATS.get(col.type)
    if fmt and kind != "any":
        out["format"] = fmt
    if col.category == "E":
        out["enum"] = list(col.enum_labels)
    if not rules:
        return out
    r = f.rule
    if f.text_limit is not None and kind == "string":
        out["maxLength"] = f.text_limit
    if r.min_length is not None:
        out["minLength"] = r.min_length
    if r.pattern is not None:
        out["pattern"] = r.pattern
    if r.min_value is not None:
        out["minimum"] = r.min_value
    if r.max_value is not None:
        out["maximum"] = r.max_value
    if f.enum is not None:
        out["enum"] = [render(v) for v in f.enum]
    return out


def field_schema(f: Field, *, rules: bool = True) -> dict[str, Any]:
    col = f.column
    if col.is_array:
        out: dict[str, Any] = {"type": "array", "items": _scalar(f, element=True, rules=False)}
    else:
        out = _scalar(f, rules=rules)
    if not col.not_null:
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def _entity_schemas(e: Entity, entities: Mapping[str, Entity]) -> dict[str, Any]:
    name = _schema_name(e.alias)
    read: dict[str, Any] = {
        "type": "object",
        "properties": {n: field_schema(f, rules=False) for n, f in e.fields.items()},
        "required": list(e.fields),
    }
    for rel in e.relations.values():
        read["properties"][rel.name] = {"type": "array", "items": _ref(_schema_name(rel.child))}
    create = {
        "type": "object", "additionalProperties": False,
        "properties": {n: field_schema(f) for n, f in e.fields.items() if f.rule.creatable},
        "required": [n for n, f in e.fields.items() if f.required],
    }
    replace = {
        "type": "object", "additionalProperties": False,
        "properties": {n: field_schema(f) for n, f in e.fields.items()},
        "required": [n for n, f in e.fields.items() if f.required],
    }
    patch = {"type": "object", "additionalProperties": False,
             "properties": {n: field_schema(f) for n, f in e.fields.items()}}
    keyed = {**patch, "required": list(e.key)}
    keyed_replace = {**replace, "required": sorted({*(n for n, f in e.fields.items()
                                                       if f.required), *e.key})}
    out = {
        name: read,
        f"{name}Create": create,
        f"{name}Replace": replace,
        f"{name}Patch": patch,
        f"{name}PatchItem": keyed,
        f"{name}ReplaceItem": keyed_replace,
        f"{name}One": {"type": "object", "required": ["data"],
                       "properties": {"data": _ref(name)}},
        f"{name}Page": {"type": "object", "required": ["data", "meta"], "properties": {
            "data": {"type": "array", "items": _ref(name)}, "meta": _ref("PageMeta")}},
        f"{name}Saved": {"type": "object", "required": ["data"], "properties": {
            "data": {"type": "array", "items": {"anyOf": [_ref(name), {"type": "null"}]}},
            "errors": {"type": "array", "items": _ref("Problem")}}},
    }
    for suffix, item in (("Create", "Create"), ("Replace", "ReplaceItem"),
                         ("Patch", "PatchItem")):
        out[f"{name}{suffix}Batch"] = {
            "type": "object", "required": ["data"], "additionalProperties": False,
            "properties": {"data": {"type": "array", "minItems": 1,
                                    "items": _ref(f"{name}{item}")}}}
    return out


def _errors() -> dict[str, Any]:
    return {status: {"description": "error", "content": {"application/json": {
        "schema": _ref("Errors")}}} for status in _ERROR_STATUSES}


def _ok(status: str, schema: str, description: str) -> dict[str, Any]:
    return {status: {"description": description,
                     "content": {"application/json": {"schema": _ref(schema)}}}}


def _list_params(e: Entity, entities: Mapping[str, Entity]) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                     "maximum": MAX_OFFSET}},
        {"name": "limit", "in": "query",
         "schema": {"type": "integer", "minimum": 1, "maximum": e.max_limit}},
        {"name": "sort", "in": "query", "schema": {"type": "string"},
         "description": "fields, comma-separated; '-' for descending"},
    ]
    if e.relations:
        params.append({"name": "include", "in": "query", "schema": {"type": "string"},
                       "description": "relations: " + ", ".join(e.relations)})
    for n, f in e.fields.items():
        if not filterable(f):
            continue
        scalar = _scalar(f, rules=False)
        for op in OPS:
            if op in ("gt", "gte", "lt", "lte") and f.column.type not in _RANGE_TYPES:
                continue
            if op == "null" and f.column.not_null:
                continue
            schema = scalar if op in ("eq", "ne", "gt", "gte", "lt", "lte") else (
                {"type": "boolean"} if op == "null" else {"type": "string"})
            params.append({"name": n if op == "eq" else f"{n}[{op}]", "in": "query",
                           "schema": schema, "required": False})
    for rel in e.relations.values():
        child = entities[rel.child]
        for n, f in child.fields.items():
            if filterable(f):
                params.append({"name": f"{rel.name}.{n}", "in": "query",
                               "schema": _scalar(f, rules=False), "required": False})
    return params


def document(entities: Mapping[str, Entity], *, title: str = "dx Data Exchange API",
             version: str = "1") -> dict[str, Any]:
    schemas: dict[str, Any] = {
        "Problem": {"type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string"}, "message": {"type": "string"},
            "path": {"type": "string"}}},
        "Errors": {"type": "object", "required": ["errors"], "properties": {
            "errors": {"type": "array", "items": _ref("Problem")}}},
        "PageMeta": {"type": "object", "required": ["offset", "limit", "total"], "properties": {
            "offset": {"type": "integer"}, "limit": {"type": "integer"},
            "total": {"type": "integer"}}},
    }
    paths: dict[str, Any] = {}
    tx_header = {"name": TRANSACTION_HEADER, "in": "header", "required": False,
                 "schema": {"type": "string", "enum": ["request", "per-entity"]},
                 "description": "request (default): all rows or none; per-entity: each row "
                                "on its own, saved rows and errors returned"}
    for e in entities.values():
        schemas.update(_entity_schemas(e, entities))
        name = _schema_name(e.alias)
        id_param = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
                    "description": "key: " + ",".join(e.key)}
        include = [{"name": "include", "in": "query", "schema": {"type": "string"}}] \
            if e.relations else []
        collection: dict[str, Any] = {
            "get": {"tags": [e.alias], "operationId": f"list_{e.alias}",
                    "summary": f"List {e.alias}", "parameters": _list_params(e, entities),
                    "responses": {**_ok("200", f"{name}Page", "a page"), **_errors()}},
        }
        item: dict[str, Any] = {
            "get": {"tags": [e.alias], "operationId": f"get_{e.alias}",
                    "summary": f"Read one {e.alias}", "parameters": [id_param, *include],
                    "responses": {**_ok("200", f"{name}One", "the row"), **_errors()}},
        }
        writes = {**_ok("200", f"{name}Saved", "saved rows"),
                  **_ok("201", f"{name}Saved", "saved rows"),
                  **_ok("207", f"{name}Saved", "per-entity: some saved, some not"),
                  **_errors()}
        if e.creatable:
            collection["post"] = {
                "tags": [e.alias], "operationId": f"create_{e.alias}",
                "summary": f"Create {e.alias} (one object or {{\"data\": [...]}})",
                "parameters": [tx_header],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "oneOf": [_ref(f"{name}Create"), _ref(f"{name}CreateBatch")]}}}},
                "responses": {**writes, "201": {"description": "created", "content": {
                    "application/json": {"schema": {"anyOf": [
                        _ref(f"{name}One"), _ref(f"{name}Saved")]}}}}}}
        collection["put"] = {
            "tags": [e.alias], "operationId": f"replace_many_{e.alias}",
            "summary": f"Create or replace many {e.alias} (each item carries its key)",
            "parameters": [tx_header],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref(f"{name}ReplaceBatch")}}},
            "responses": writes}
        collection["patch"] = {
            "tags": [e.alias], "operationId": f"update_many_{e.alias}",
            "summary": f"Update many {e.alias} (each item carries its key)",
            "parameters": [tx_header],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref(f"{name}PatchBatch")}}},
            "responses": writes}
        item["put"] = {
            "tags": [e.alias], "operationId": f"replace_{e.alias}",
            "summary": f"Create or replace one {e.alias}", "parameters": [id_param],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref(f"{name}Replace")}}},
            "responses": {**_ok("200", f"{name}One", "replaced"),
                          **_ok("201", f"{name}One", "created"), **_errors()}}
        item["patch"] = {
            "tags": [e.alias], "operationId": f"update_{e.alias}",
            "summary": f"Update fields of one {e.alias}", "parameters": [id_param],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref(f"{name}Patch")}}},
            "responses": {**_ok("200", f"{name}One", "updated"), **_errors()}}
        if e.delete:
            item["delete"] = {
                "tags": [e.alias], "operationId": f"delete_{e.alias}",
                "summary": f"Delete one {e.alias} (refused while children exist)",
                "parameters": [id_param],
                "responses": {**_ok("200", f"{name}One", "the deleted row"), **_errors()}}
        paths[f"/{e.alias}"] = collection
        paths[f"/{e.alias}/{{id}}"] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "Generated from dx.yaml's api: section."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key",
                           "description": "an API key (api.keys); also accepted as "
                                          "Authorization: Bearer"},
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "an API key or an OAuth2 access token"},
                "oauth2": {"type": "oauth2",
                           "description": "client credentials (api.clients, RFC 6749 §4.4): "
                                          "POST /oauth/token with HTTP Basic or client_id/"
                                          "client_secret, grant_type=client_credentials and an "
                                          "optional space-separated scope; errors invalid_request"
                                          ", invalid_client (401), unsupported_grant_type, "
                                          "invalid_scope",
                           "flows": {"clientCredentials": {"tokenUrl": "/oauth/token",
                                                           "scopes": oauth_scopes(entities)}}},
            },
        },
        "security": [{"apiKey": []}, {"bearer": []}, {"oauth2": []}],
    }


def oauth_scopes(entities: Mapping[str, Entity]) -> dict[str, str]:
    """The OAuth2 scopes: ``alias:read|write|delete`` per entity and ``*:...`` for all."""
    out: dict[str, str] = {}
    for alias in ["*", *sorted(entities)]:
        what = "every entity" if alias == "*" else alias
        methods = ["read", "write"] + (["delete"] if alias == "*" or entities[alias].delete
                                       else [])
        for m in methods:
            out[f"{alias}:{m}"] = f"{m} {what}"
    return out
