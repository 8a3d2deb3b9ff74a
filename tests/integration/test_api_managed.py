"""Entities and keys the console stores (``dx.api_entity``, ``dx.api_key``) served by two API
replicas at once: an edit reaches both within seconds, the statements each replica keeps follow it
(a field taken out of the entity stops leaving the database at once, for query shapes already
kept), and a revoked key stops working on both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from pipeline.api import managed
from pipeline.config.api import ApiEntity
from tests.integration.test_api_support import Served, serve, write_config
from tests.integration.test_sink_support import wait_for

BRAND: dict[str, Any] = {
    "alias": "brands", "table": "brands",
    "fields": {"id": {"creatable": False, "editable": False}, "name": {}, "note": {}}}


def _save(db: str, definition: dict[str, Any]) -> None:
    with psycopg.connect(db) as conn:
        managed.save(conn, ApiEntity.model_validate(definition), "ana")
        conn.commit()


def test_console_edits_and_revocations_reach_every_replica(pg_db: str, stack: Any,
                                                           tmp_path: Path) -> None:
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE brands (id serial PRIMARY KEY, name text NOT NULL, note text)")
        conn.execute("INSERT INTO brands (name, note) VALUES ('Acme', 'internal')")
    with psycopg.connect(pg_db) as conn:
        managed.ensure_schema(conn)
        managed.save(conn, ApiEntity.model_validate(BRAND), "ana")
        secret = managed.add_key(conn, "shop", "shop", {"brands": ["read", "write"]}, "ana")
        conn.commit()
    path = write_config(tmp_path / "dx.yaml", pg_db, stack,
                        api="api: {rate_limit: {requests: 100000, per_s: 1}}")
    with serve(path) as one, serve(path) as two:
        replicas = (one, two)

        def listed(s: Served, **params: str) -> list[dict[str, Any]]:
            with s.client(secret) as c:
                r = c.get("/brands", params=params)
                assert r.status_code == 200, r.text
                return list(r.json()["data"])

        for s in replicas:  # every statement shape below is composed and kept once
            assert listed(s, name="Acme") == [{"id": 1, "name": "Acme", "note": "internal"}]
            assert listed(s, note="internal", sort="-name")[0]["note"] == "internal"
            with s.client(secret) as c:
                assert c.get("/brands/1").json()["data"]["note"] == "internal"
                created = c.post("/brands", json={"data": [{"name": "B1", "note": "x"},
                                                           {"name": "B2"}]})
                assert created.status_code == 201, created.text
                assert [r["name"] for r in created.json()["data"]] == ["B1", "B2"]
        for s in replicas:  # [null]=true and [null]=false: one operator, two statements
            assert [r["name"] for r in listed(s, **{"note[null]": "true"})] == ["B2", "B2"]
            assert [r["name"] for r in listed(s, **{"note[null]": "false"})] == ["Acme", "B1",
                                                                                 "B1"]

        # the console takes 'note' out of the entity: no replica reads or writes it any more
        _save(pg_db, {**BRAND, "fields": {k: v for k, v in BRAND["fields"].items()
                                          if k != "note"}})
        wait_for(lambda: all("note" not in listed(s, name="Acme")[0] for s in replicas),
                 timeout=30, what="both replicas to reload the edited entity")
        for s in replicas:
            assert listed(s, name="Acme") == [{"id": 1, "name": "Acme"}]
            with s.client(secret) as c:
                assert c.get("/brands/1").json()["data"] == {"id": 1, "name": "Acme"}
                r = c.get("/brands", params={"note": "internal", "sort": "-name"})
                assert r.status_code == 400
                assert r.json()["errors"][0]["code"] == "unknown_field"
                r = c.post("/brands", json={"data": [{"name": "B3", "note": "x"},
                                                     {"name": "B4"}]})
                assert r.status_code == 400 and r.json()["errors"][0]["path"] == "data[0].note"

        # revoked in the console: refused by both replicas within seconds
        with psycopg.connect(pg_db) as conn:
            assert managed.revoke_key(conn, "shop")
            conn.commit()

        def refused(s: Served) -> bool:
            with s.client(secret) as c:
                return c.get("/brands/1").status_code == 401

        wait_for(lambda: all(refused(s) for s in replicas), timeout=30,
                 what="both replicas to refuse the revoked key")
