"""Pages and JSON endpoints for the Data Exchange API's entities and keys (admins change them;
everyone logged in reads them; a key's secret is shown once, to the admin who made it)."""

from __future__ import annotations

from typing import Any

import psycopg
import yaml
from fastapi import APIRouter, Body, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from pipeline.console import audit, entities
from pipeline.console.views import redirect_with, render
from pipeline.console.web import acting, caller, db, form_fields

router = APIRouter(include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["console"])


def _cfg(request: Request) -> Any:
    return request.app.state.dashboard.cfg


@router.get("/entities")
def entity_list(request: Request, conn: psycopg.Connection[Any] = Depends(db)) -> HTMLResponse:
    c = caller(request, conn)
    return render(request, "entities.html", c, listed=entities.listing(conn, _cfg(request)),
                  msg=request.query_params.get("msg"))


@router.get("/entities/{alias}")
def entity_page(request: Request, alias: str,
                conn: psycopg.Connection[Any] = Depends(db)) -> HTMLResponse:
    c = caller(request, conn)
    found = next((x for x in entities.listing(conn, _cfg(request)) if x.entity.alias == alias),
                 None)
    if found is None and alias != "new":
        raise HTTPException(404, f"no entity {alias!r}")
    return render(request, "entity.html", c, alias="" if found is None else alias,
                  found=found, text=entities.as_yaml(found.entity) if found else
                  "table: public.my_table\nfields:\n  id: {creatable: false}\n",
                  problems=[], trail=audit.entries(conn, "entity", alias),
                  msg=request.query_params.get("msg"))


@router.post("/entities")
def entity_save(request: Request, fields: dict[str, str] = Depends(form_fields),
                conn: psycopg.Connection[Any] = Depends(db)) -> Response:
    c = acting(request, conn, fields, "entities")
    alias, text = fields.get("alias", "").strip(), fields.get("definition", "")
    entity, problems = entities.check(conn, _cfg(request), alias, text)
    if entity is None:
        return render(request, "entity.html", c, status_code=422, alias=alias, found=None,
                      text=text, problems=problems, trail=[], msg=None)
    created = entities.save(conn, c.principal, entity)
    verb = "created" if created else "saved"
    return redirect_with(f"/entities/{alias}", f"entity {alias} {verb}; every dx api serve "
                                               "picks it up within seconds")


@router.post("/entities/{alias}/delete")
def entity_delete(request: Request, alias: str, fields: dict[str, str] = Depends(form_fields),
                  conn: psycopg.Connection[Any] = Depends(db)) -> Response:
    c = acting(request, conn, fields, "entities")
    if not entities.remove(conn, c.principal, alias):
        raise HTTPException(404, f"no console entity {alias!r} (dx.yaml ones are read-only)")
    return redirect_with("/entities", f"entity {alias} removed")


@api_router.get("/entities", summary="every API entity, with who manages it")
def api_entities(request: Request,
                 conn: psycopg.Connection[Any] = Depends(db)) -> list[dict[str, Any]]:
    caller(request, conn)
    return [{"alias": x.entity.alias, "managed_by": x.managed_by,
             "definition": x.entity.model_dump(mode="json", exclude={"alias"},
                                               exclude_defaults=True)}
            for x in entities.listing(conn, _cfg(request))]


@api_router.put("/entities/{alias}", summary="create or replace a console-managed entity")
def api_entity_put(request: Request, alias: str, definition: dict[str, Any] = Body(...),
                   conn: psycopg.Connection[Any] = Depends(db)) -> dict[str, Any]:
    c = acting(request, conn, {}, "entities")
    entity, problems = entities.check(conn, _cfg(request), alias, yaml.safe_dump(definition))
    if entity is None:
        raise HTTPException(422, [{"field": p.where, "message": p.message} for p in problems])
    return {"alias": alias, "created": entities.save(conn, c.principal, entity)}


@api_router.delete("/entities/{alias}", summary="remove a console-managed entity")
def api_entity_delete(request: Request, alias: str,
                      conn: psycopg.Connection[Any] = Depends(db)) -> dict[str, Any]:
    c = acting(request, conn, {}, "entities")
    if not entities.remove(conn, c.principal, alias):
        raise HTTPException(404, f"no console entity {alias!r}")
    return {"alias": alias, "removed": True}


# -- API keys -----------------------------------------------------------------------------------


@router.get("/keys")
def key_list(request: Request, conn: psycopg.Connection[Any] = Depends(db)) -> HTMLResponse:
    c = caller(request, conn)
    return render(request, "keys.html", c, keys=entities.key_listing(conn, _cfg(request)),
                  trail=audit.entries(conn, "key"), problems=[], secret=None, form={},
                  msg=request.query_params.get("msg"))


@router.post("/keys")
def key_create(request: Request, fields: dict[str, str] = Depends(form_fields),
               conn: psycopg.Connection[Any] = Depends(db)) -> HTMLResponse:
    c = acting(request, conn, fields, "entities")
    key_id = fields.get("id", "").strip()
    secret, problems = entities.create_key(conn, c.principal, _cfg(request), key_id,
                                           fields.get("system", "").strip(),
                                           fields.get("scopes", ""))
    return render(request, "keys.html", c, status_code=201 if secret else 422,
                  keys=entities.key_listing(conn, _cfg(request)),
                  trail=audit.entries(conn, "key"), problems=problems, secret=secret,
                  new_id=key_id, form={} if secret else fields, msg=None)


@router.post("/keys/{key_id}/revoke")
def key_revoke(request: Request, key_id: str, fields: dict[str, str] = Depends(form_fields),
               conn: psycopg.Connection[Any] = Depends(db)) -> Response:
    c = acting(request, conn, fields, "entities")
    if not entities.revoke_key(conn, c.principal, key_id):
        raise HTTPException(404, f"no active console key {key_id!r}")
    return redirect_with("/keys", f"key {key_id} revoked; every dx api serve refuses it within "
                                  "seconds")


@api_router.get("/keys", summary="API keys (never their secrets)")
def api_keys(request: Request,
             conn: psycopg.Connection[Any] = Depends(db)) -> list[dict[str, Any]]:
    caller(request, conn)
    return entities.key_listing(conn, _cfg(request))


@api_router.post("/keys", summary="create an API key; the secret is in this answer only")
def api_key_create(request: Request, body: dict[str, Any] = Body(...),
                   conn: psycopg.Connection[Any] = Depends(db)) -> dict[str, Any]:
    c = acting(request, conn, {}, "entities")
    scopes = body.get("scopes") or {}
    text = "\n".join(f"{k}: {', '.join(v)}" for k, v in scopes.items()) \
        if isinstance(scopes, dict) else ""
    secret, problems = entities.create_key(conn, c.principal, _cfg(request),
                                           str(body.get("id", "")), str(body.get("system", "")),
                                           text)
    if secret is None:
        raise HTTPException(422, [{"field": p.where, "message": p.message} for p in problems])
    return {"id": body.get("id"), "secret": secret}


@api_router.post("/keys/{key_id}/revoke", summary="revoke a console-made API key")
def api_key_revoke(request: Request, key_id: str,
                   conn: psycopg.Connection[Any] = Depends(db)) -> dict[str, Any]:
    c = acting(request, conn, {}, "entities")
    if not entities.revoke_key(conn, c.principal, key_id):
        raise HTTPException(404, f"no active console key {key_id!r}")
    return {"id": key_id, "revoked": True}
