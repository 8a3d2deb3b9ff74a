"""The FastAPI application: generic routes over the entities of the current configuration.

Routes are generic (``/{alias}``, ``/{alias}/{id}``) and look the entity up in the current
:class:`ApiState`, so a reload (``POST /-/reload`` with an admin key, or SIGHUP to ``dx api
serve``) swaps entities, keys, OAuth2 clients and the OpenAPI document without a restart (tokens
of removed clients stop working); a refused reload keeps the running state. Callers present an
API key (``X-Api-Key`` or ``Authorization: Bearer``) or an access token from ``POST
/oauth/token`` (``Authorization: Bearer``, see ``pipeline.api.oauth``).
Request order: authenticate (401), rate limit (429), entity (404), method
(405), scope (403), then the request itself.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.api.access_log import AccessLog
from pipeline.api.body_limit import BodyLimit
from pipeline.api.catalog import Entity, load_entities
from pipeline.api.errors import ApiError, Problem, fail, join_path, status_for
from pipeline.api.managed import Watcher, read_signature, with_stored
from pipeline.api.oauth import (
    MAX_BODY,
    TOKEN_PREFIX,
    ClientRing,
    OAuthError,
    TokenStore,
    token_request,
)
from pipeline.api.openapi import TRANSACTION_HEADER, document
from pipeline.api.query import (
    attach_children,
    get_row,
    list_rows,
    parse_id,
    parse_include,
    parse_list,
    render_row,
)
from pipeline.api.security import SCOPE_BY_METHOD, KeyRing, Principal, RateLimiter, presented_key
from pipeline.api.store import Op, Pool, Writer
from pipeline.api.validate import Mode, batch_items, item_path, validate_item
from pipeline.config.loader import load_config
from pipeline.config.model import DxConfig
from pipeline.db import connection
from pipeline.errors import DxError, ServiceUnavailable
from pipeline.row_errors import log_text
from pipeline.swagger import mount_swagger

log = logging.getLogger(__name__)

_WRITE_KIND: dict[str, Mode] = {"POST": "create", "PUT": "replace", "PATCH": "update"}
_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@dataclass(frozen=True)
class ApiState:
    """Everything a request needs, swapped as one on reload."""

    config: DxConfig
    entities: dict[str, Entity]
    keys: KeyRing
    clients: ClientRing
    openapi: dict[str, Any]


def build_state(config: DxConfig, env: dict[str, str] | None = None) -> ApiState:
    """Check ``config.api`` against the catalog and build the serving state (ConfigError)."""
    with connection(config.database.url.get_secret_value(), application_name="dx-api",
                    connect_timeout_s=config.database.connect_timeout_s) as conn:
        config = with_stored(conn, config)  # + the console's entities (dx.api_entity)
        entities = load_entities(conn, config)
        conn.rollback()
    keys = KeyRing(config.api, env, file=config.where()[0])
    clients = ClientRing(config.api, env, file=config.where()[0])
    return ApiState(config=config, entities=entities, keys=keys, clients=clients,
                    openapi=document(entities))


class DataExchangeApi:
    """The application and its mutable parts (state, pool, rate limiter)."""

    def __init__(self, config: DxConfig, *, config_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.env = env
        # read before the state is built, so no console change slips in between
        seen = read_signature(config.database.url.get_secret_value())
        self.state = build_state(config, env)
        self.pool = self._pool(config)
        self.limiter = RateLimiter()
        self.tokens = TokenStore()  # survives reloads; retain() drops removed clients' tokens
        self._reload_lock = threading.Lock()
        self.app = self._build()
        self.file_config = config  # dx.yaml as read; the state adds the console's entities
        self.watcher = Watcher(config.database.url.get_secret_value(), self.refresh,
                               seen=seen).start()

    @staticmethod
    def _pool(config: DxConfig) -> Pool:
        return Pool(config.database.url.get_secret_value(), config.api.pool_size,
                    connect_timeout_s=config.database.connect_timeout_s,
                    statement_timeout_ms=config.api.statement_timeout_ms)

    def reload(self) -> ApiState:
        """Re-read dx.yaml and swap the state; on any error the running state stays."""
        if self.config_path is None:
            raise fail("invalid_config", "this API was not started from a file")
        with self._reload_lock:
            config = load_config(self.config_path, env=self.env)
            state = build_state(config, self.env)
            old = self.state.config
            if (config.database.url.get_secret_value() != old.database.url.get_secret_value()
                    or config.api.pool_size != old.api.pool_size
                    or config.api.statement_timeout_ms != old.api.statement_timeout_ms):
                pool, self.pool = self.pool, self._pool(config)
                pool.close()
            self.state = state
            self.file_config = config
            revoked = self.tokens.retain(state.clients)
        log.info("api reloaded: %d entities, %d keys, %d clients (%d tokens revoked)",
                 len(state.entities), len(state.keys), len(state.clients), revoked)
        return state

    def refresh(self) -> ApiState:
        """Rebuild the state with the console's current entities (the watcher calls it when
        dx.api_entity changed); on any error the running state stays."""
        with self._reload_lock:
            state = build_state(self.file_config, self.env)
            self.state = state
            self.tokens.retain(state.clients)
        log.info("api entities refreshed: %d entities", len(state.entities))
        return state

    def close(self) -> None:
        self.watcher.close()
        self.pool.close()

    # ---- request plumbing -------------------------------------------------------------------

    def _principal(self, request: Request) -> Principal:
        state = self.state
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        bearer = bearer.strip()
        if ("x-api-key" not in request.headers and scheme.lower() == "bearer"
                and bearer.startswith(TOKEN_PREFIX)):
            principal = self.tokens.authenticate(bearer, state.clients)
            request.state.client_id = principal.id
        else:
            principal = state.keys.authenticate(presented_key(request.headers))
            request.state.key_id = principal.id
        wait = self.limiter.take(f"{principal.kind}:{principal.id}", principal.rate)
        if wait > 0:
            raise fail("rate_limited", f"too many requests for this {principal.kind}",
                       headers={"Retry-After": str(max(1, round(wait)))})
        return principal

    def _entity(self, alias: str, method: str, principal: Principal, *,
                item: bool) -> Entity:
        entity = self.state.entities.get(alias)
        if entity is None:
            raise fail("not_found", f"no entity {alias!r}")
        allowed = self._methods(entity, item=item)
        if method not in allowed:
            raise fail("method_not_allowed", f"{method} is not allowed on this "
                       f"{'row' if item else 'collection'}",
                       headers={"Allow": ", ".join(allowed)})
        scope = SCOPE_BY_METHOD[method]
        if not principal.knows(alias):
            raise fail("forbidden", f"this {principal.kind} has no access to {alias}")
        if not principal.may(alias, scope):
            raise fail("forbidden", f"this {principal.kind} may not {scope} {alias}")
        return entity

    @staticmethod
    def _methods(entity: Entity, *, item: bool) -> list[str]:
        if item:
            return ["GET", "PUT", "PATCH"] + (["DELETE"] if entity.delete else [])
        return ["GET"] + (["POST"] if entity.creatable else []) + ["PUT", "PATCH"]

    def _can_read(self, principal: Principal) -> Callable[[str], bool]:
        return lambda alias: principal.may(alias, "read")

    # ---- reads ------------------------------------------------------------------------------

    def list_rows(self, entity: Entity, params: list[tuple[str, str]],
             principal: Principal) -> dict[str, Any]:
        state = self.state
        q = parse_list(entity, state.entities, params, state.config.api.default_limit,
                       self._can_read(principal))
        with self.pool.connection(autocommit=True) as conn:
            rows, total = list_rows(conn, entity, state.entities, q)
            attach_children(conn, state.entities, entity, rows, q.include)
        return {"data": [render_row(r) for r in rows],
                "meta": {"offset": q.offset, "limit": q.limit, "total": total}}

    def get(self, entity: Entity, raw_id: str, params: list[tuple[str, str]],
            principal: Principal) -> dict[str, Any]:
        include_raw = None
        for name, value in params:
            if name != "include":
                raise fail("unknown_field", f"unknown query parameter {name!r}", name)
            include_raw = value
        include = parse_include(entity, include_raw, self._can_read(principal))
        key = parse_id(entity, raw_id)
        with self.pool.connection(autocommit=True) as conn:
            row = get_row(conn, entity, key)
            if row is None:
                raise fail("not_found", f"no {entity.alias} with id {raw_id!r}", "id")
            attach_children(conn, self.state.entities, entity, [row], include)
        return {"data": render_row(row)}

    # ---- writes -----------------------------------------------------------------------------

    def write(self, entity: Entity, method: str, raw_id: str | None, body: Any,
              per_entity: bool, principal: Principal) -> tuple[int, dict[str, Any]]:
        kind = "delete" if method == "DELETE" else _WRITE_KIND[method]
        ops: list[Op] = []
        batch = False
        if raw_id is not None:
            key = parse_id(entity, raw_id)
            url_key = dict(zip(entity.key, key, strict=True))
            if kind == "delete":
                ops.append(Op(path="", kind="delete", key=key))
            else:
                items, batch, problems = batch_items(body)
                if problems or batch:
                    raise ApiError(problems or [Problem(
                        "bad_body", "a row URL takes one object, not {\"data\": [...]}")])
                mode: Mode = "replace" if kind == "replace" else "update"
                values, problems = validate_item(entity, items[0], mode, "", url_key)
                ops.append(Op(path="", kind=kind, values=values, key=key, problems=problems))
        else:
            items, batch, problems = batch_items(body)
            if problems:
                raise ApiError(problems)
            if kind != "create" and not batch:
                raise fail("bad_body", f"{method} on the collection takes {{\"data\": [...]}} "
                                       "whose items carry their key; use /{alias}/{id} for one")
            limit = self.state.config.api.max_batch
            if len(items) > limit:
                raise fail("payload_too_large", f"{len(items)} rows; at most {limit} per request",
                           "data")
            for i, item in enumerate(items):
                path = item_path(batch, i)
                values, problems = validate_item(entity, item, _WRITE_KIND[method], path)
                key = None
                if kind != "create" and not any(p.code == "bad_body" for p in problems):
                    missing = [k for k in entity.key if k not in values]
                    problems += [Problem("missing_id", f"{k} (the key) is missing",
                                         join_path(path, k))
                                 for k in missing if not any(
                                     p.path == join_path(path, k) for p in problems)]
                    if not missing:
                        key = tuple(values[k] for k in entity.key)
                ops.append(Op(path=path, kind=kind, values=values, key=key, problems=problems))
        if not per_entity or not batch:
            invalid = [p for op in ops for p in op.problems]
            if invalid:
                raise ApiError(invalid)
        with self.pool.connection() as conn:
            Writer(conn, entity, principal.system).run(ops, self.state.entities)
            problems = [p for op in ops for p in op.problems]
            if problems and (not per_entity or not batch):
                conn.rollback()
                raise ApiError(problems)
            conn.commit()
        created = any(op.created for op in ops)
        if not batch:
            return (201 if created else 200), {"data": render_row(ops[0].row or {})}
        saved = [render_row(op.row) if op.row is not None and not op.problems else None
                 for op in ops]
        out: dict[str, Any] = {"data": saved}
        ok = 201 if kind == "create" else 200
        if per_entity:
            problems = [p for op in ops for p in op.problems]
            out["errors"] = [p.to_json() for p in problems]
            if problems:
                n_saved = sum(1 for s in saved if s is not None)
                return (207 if n_saved else status_for(problems)), out
        return ok, out

    # ---- the FastAPI app --------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI(title="dx Data Exchange API", openapi_url=None, docs_url=None,
                      redoc_url=None)
        api = self

        @app.exception_handler(ApiError)
        async def _api_error(request: Request, err: ApiError) -> Response:
            return _errors(err.status, [p.to_json() for p in err.problems], err.headers)

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(request: Request, err: StarletteHTTPException) -> Response:
            code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code,
                                                                     "bad_query")
            return _errors(err.status_code, [{"code": code, "message": str(err.detail)}],
                           dict(err.headers or {}))

        @app.exception_handler(ServiceUnavailable)
        async def _unavailable(request: Request, err: ServiceUnavailable) -> Response:
            return _errors(503, [{"code": "unavailable", "message": "the database is "
                                                                    "unreachable"}],
                           {"Retry-After": "1"})

        @app.exception_handler(psycopg.OperationalError)
        async def _db_down(request: Request, err: psycopg.OperationalError) -> Response:
            log.warning("database error: %s", str(err).strip().splitlines()[0] if str(err)
                        else type(err).__name__)
            return _errors(503, [{"code": "unavailable", "message": "database error; retry"}],
                           {"Retry-After": "1"})

        @app.exception_handler(psycopg.Error)
        async def _db_error(request: Request, err: psycopg.Error) -> Response:
            # Not a row's fault (those are problems at their path): a deadlock or serialization
            # failure is worth a retry, anything else is ours. The text stays in our log only
            # (it can quote hidden columns), as SQLSTATE, table and constraint.
            log.error("%s %s: database error (%s)", request.method, request.url.path,
                      log_text(err))
            if (err.sqlstate or "").startswith("40"):
                return _errors(503, [{"code": "unavailable", "message": "the database asked "
                                      "for a retry (conflict with another transaction)"}],
                               {"Retry-After": "1"})
            return _errors(500, [{"code": "internal_error", "message": "the request failed "
                                  "inside dx; the operator log has the details"}])

        # Inside the access log (added first), so refused bodies are logged like any request.
        app.add_middleware(BodyLimit, limit_for=lambda path: MAX_BODY
                           if path == "/oauth/token" else api.state.config.api.max_body_bytes)
        app.add_middleware(AccessLog)

        @app.get("/openapi.json", include_in_schema=False)
        async def _openapi() -> JSONResponse:
            return JSONResponse(api.state.openapi)

        mount_swagger(app, "/openapi.json", title="dx API docs")  # assets served locally

        @app.get("/-/health", include_in_schema=False)
        async def _health() -> dict[str, Any]:
            return {"status": "ok", "entities": sorted(api.state.entities)}

        @app.post("/-/reload", include_in_schema=False)
        async def _reload(request: Request) -> JSONResponse:
            principal = api._principal(request)
            if not principal.admin:
                raise fail("forbidden", "reloading needs an admin key")
            try:
                state = await run_in_threadpool(api.reload)
            except DxError as err:
                raise fail("invalid_config", str(err)) from None
            return JSONResponse({"entities": sorted(state.entities), "keys": len(state.keys),
                                 "clients": len(state.clients)})

        @app.api_route("/oauth/token", methods=_ALL_METHODS, include_in_schema=False)
        async def _token(request: Request) -> Response:
            """OAuth2 client credentials (RFC 6749 §4.4); errors as in §5.2."""
            no_store = {"Cache-Control": "no-store", "Pragma": "no-cache"}
            if request.method != "POST":
                return JSONResponse({"error": "invalid_request",
                                     "error_description": "use POST"}, status_code=405,
                                    headers={"Allow": "POST", **no_store})
            state = api.state

            def seen(client_id: str) -> None:
                request.state.client_id = client_id

            try:
                issued = token_request(
                    content_type=request.headers.get("content-type", ""),
                    authorization=request.headers.get("authorization", ""),
                    raw=await request.body(), clients=state.clients, tokens=api.tokens,
                    limiter=api.limiter, aliases=state.entities, on_client=seen)
            except OAuthError as err:
                return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
            return JSONResponse(issued.body, headers=no_store)

        async def handle(request: Request, alias: str, raw_id: str | None) -> Response:
            principal = api._principal(request)
            method = request.method
            entity = api._entity(alias, method, principal, item=raw_id is not None)
            params = list(request.query_params.multi_items())
            if method == "GET":
                if raw_id is None:
                    data = await run_in_threadpool(api.list_rows, entity, params, principal)
                else:
                    data = await run_in_threadpool(api.get, entity, raw_id, params, principal)
                return JSONResponse(data)
            if params:
                raise fail("unknown_field", f"unknown query parameter {params[0][0]!r}",
                           params[0][0])
            mode = request.headers.get(TRANSACTION_HEADER, "request").strip().lower()
            if mode not in ("request", "per-entity"):
                raise fail("bad_query", f"{TRANSACTION_HEADER} is 'request' or 'per-entity'",
                           TRANSACTION_HEADER)
            body: Any = None
            if method != "DELETE":
                raw = await request.body()
                try:
                    body = json.loads(raw) if raw else None
                except (ValueError, UnicodeDecodeError):
                    raise fail("bad_body", "the body is not valid JSON") from None
            status, out = await run_in_threadpool(api.write, entity, method, raw_id, body,
                                                  mode == "per-entity", principal)
            return JSONResponse(out, status_code=status)

        # Starlette routes, not FastAPI's: nothing to inject, so no dependency solving per call.
        async def _collection(request: Request) -> Response:
            return await handle(request, request.path_params["alias"], None)

        async def _item(request: Request) -> Response:
            return await handle(request, request.path_params["alias"],
                                request.path_params["raw_id"])

        app.add_route("/{alias}", _collection, methods=_ALL_METHODS, include_in_schema=False)
        app.add_route("/{alias}/{raw_id}", _item, methods=_ALL_METHODS, include_in_schema=False)

        return app


def _errors(status: int, problems: list[dict[str, Any]],
            headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"errors": problems}, status_code=status, headers=headers)


def create_app(config_path: str | os.PathLike[str],
               env: dict[str, str] | None = None) -> DataExchangeApi:
    """The API for a dx.yaml file (reloadable from it)."""
    path = Path(config_path)
    return DataExchangeApi(load_config(path, env=env), config_path=path, env=env)
