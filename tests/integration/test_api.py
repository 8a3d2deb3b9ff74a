"""The Data Exchange API against the real PostgreSQL: served by a real uvicorn on localhost,
called over HTTP with httpx. Capture triggers are installed, so writes land in dx.outbox with
the API key's system as their origin."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from pipeline.capture import install as capture_install
from pipeline.config.loader import load_config
from tests.integration.relay_support import dx
from tests.integration.test_api_support import (
    API_SECTION,
    KEYS,
    SCHEMA,
    SLOW_SECRET,
    WMS_SECRET,
    Served,
    free_port,
    serve,
    write_config,
)
from tests.integration.test_sink_support import wait_for

PIM = KEYS["TEST_API_KEY_PIM"]
READER = KEYS["TEST_API_KEY_READER"]
ADMIN = KEYS["TEST_API_KEY_ADMIN"]
TABLES = """
  - name: public.products
    columns: [id, sku, name, price, status, updated_at]
  - name: public.variants
    columns: [id, product_id, sku, color]
"""


@pytest.fixture(scope="module")
def db(stack: Any) -> Iterator[str]:
    """One database for the module (the API is stateless between requests)."""
    from tests.conftest import _with_database

    name = f"dxt_api_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _with_database(stack.database_url, name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    try:
        yield url
    finally:
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


@pytest.fixture(scope="module")
def config_path(db: str, stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_config(tmp_path_factory.mktemp("api") / "dx.yaml", db, stack,
                        tables="\n" + TABLES)
    cfg = load_config(path)
    with psycopg.connect(db, autocommit=True) as conn:
        capture_install.ensure_schema(conn, cfg)
        for i in range(len(cfg.tables)):
            capture_install.install_table(conn, cfg, i)
    return path


@pytest.fixture(scope="module")
def served(config_path: Path) -> Iterator[Served]:
    with serve(config_path) as s:
        yield s


def _sku() -> str:
    return "T-" + uuid.uuid4().hex[:10].upper()


def _product(**over: Any) -> dict[str, Any]:
    return {"sku": _sku(), "title": "Widget", "price": 9.99, **over}


def _codes(resp: Any) -> list[tuple[str, str | None]]:
    return [(e["code"], e.get("path")) for e in resp.json()["errors"]]


def test_crud_roundtrip_and_database_changes_show_on_next_get(served: Served, db: str) -> None:
    with served.client(PIM) as c:
        r = c.post("/products", json=_product(title="Lamp", price=19.5))
        assert r.status_code == 201, r.text
        p = r.json()["data"]
        assert p["title"] == "Lamp" and p["price"] == 19.5 and p["status"] == "active"
        assert isinstance(p["id"], int) and "cost" not in p  # unexposed column never leaves
        pid = p["id"]

        assert c.get(f"/products/{pid}").json()["data"]["sku"] == p["sku"]

        r = c.patch(f"/products/{pid}", json={"title": "Desk lamp"})
        assert r.status_code == 200 and r.json()["data"]["title"] == "Desk lamp"
        assert r.json()["data"]["price"] == 19.5

        # PUT replaces: fields not given go back to their default
        r = c.put(f"/products/{pid}", json={"sku": p["sku"], "title": "Lamp 2", "price": 5,
                                            "status": "archived"})
        assert r.status_code == 200, r.text
        r = c.put(f"/products/{pid}", json={"title": "Lamp 3", "price": 6})
        assert r.status_code == 200 and r.json()["data"]["status"] == "active"

        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("UPDATE products SET price = 42.42 WHERE id = %s", (pid,))
        assert c.get(f"/products/{pid}").json()["data"]["price"] == 42.42

        r = c.delete(f"/products/{pid}")
        assert r.status_code == 200 and r.json()["data"]["id"] == pid
        r = c.get(f"/products/{pid}")
        assert r.status_code == 404 and _codes(r) == [("not_found", "id")]


def test_list_filters_sort_pagination_and_include(served: Served) -> None:
    tag = uuid.uuid4().hex[:6].upper()
    rows = [{"sku": f"L-{tag}-{i:02d}", "title": f"Item {i}", "price": i,
             "status": "archived" if i % 5 == 0 else "active"} for i in range(30)]
    with served.client(PIM) as c:
        r = c.post("/products", json={"data": rows})
        assert r.status_code == 201, r.text
        ids = [p["id"] for p in r.json()["data"]]
        r = c.post("/variants", json={"data": [
            {"product_id": ids[3], "sku": f"V-{tag}-1", "color": "red"},
            {"product_id": ids[3], "sku": f"V-{tag}-2", "color": "blue"},
            {"product_id": ids[4], "sku": f"V-{tag}-3", "color": "blue"}]})
        assert r.status_code == 201, r.text

        skus = ",".join(f"L-{tag}-{i:02d}" for i in range(30))
        r = c.get("/products", params={"sku[in]": skus, "price[gte]": "10", "price[lt]": "20",
                                       "status": "active", "sort": "-price", "limit": "3",
                                       "offset": "1"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["meta"] == {"offset": 1, "limit": 3, "total": 8}  # 10..19 without 10, 15
        assert [p["price"] for p in body["data"]] == [18, 17, 16]
        r = c.get("/products", params={"offset": str(2**63)})  # beyond PostgreSQL's bigint
        assert r.status_code == 400 and _codes(r) == [("bad_query", "offset")]

        r = c.get("/products", params={"id[in]": f"{ids[3]},{ids[4]}", "include": "variants",
                                       "sort": "id"})
        data = r.json()["data"]
        assert [len(p["variants"]) for p in data] == [2, 1]
        assert {v["color"] for v in data[0]["variants"]} == {"red", "blue"}

        r = c.get("/products", params={"variants.color": "red", "sku[in]": skus})
        assert [p["id"] for p in r.json()["data"]] == [ids[3]]
        r = c.get(f"/products/{ids[4]}", params={"include": "variants"})
        assert r.json()["data"]["variants"][0]["sku"] == f"V-{tag}-3"

        r = c.get("/products", params={"limit": "201"})
        assert r.status_code == 400 and _codes(r) == [("bad_query", "limit")]
        r = c.get("/products", params={"cost": "1"})  # a column that is not exposed
        assert r.status_code == 400 and _codes(r) == [("unknown_field", "cost")]
        r = c.get("/products", params={"sort": "price;DROP TABLE products"})
        assert r.status_code == 400 and _codes(r)[0][0] == "unknown_field"
        r = c.get("/products", params={"sku": "x' OR '1'='1"})
        assert r.status_code == 200 and r.json()["meta"]["total"] == 0
        r = c.get("/products", params={'title") OR 1=1 --': "x"})
        assert r.status_code == 400 and _codes(r)[0][0] == "unknown_field"
        r = c.get("/products", params={"price[gte]": "abc"})
        assert r.status_code == 400 and _codes(r) == [("bad_query", "price[gte]")]


def _thousand(tag: str) -> list[dict[str, Any]]:
    rows = [{"sku": f"B-{tag}-{i:04d}", "title": f"Bulk {i}", "price": i % 100 + 0.5}
            for i in range(1000)]
    rows[10]["price"] = -1                      # min_value
    rows[500]["sku"] = "lower-case"             # pattern
    del rows[999]["title"]                      # required
    return rows


def _count(db: str, tag: str) -> int:
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT count(*) FROM products WHERE sku LIKE %s",
                           (f"B-{tag}-%",)).fetchone()
        assert row is not None
        return int(row[0])


EXPECTED = [("min_value", "data[10].price"), ("pattern", "data[500].sku"),
            ("required", "data[999].title")]


def test_batch_of_1000_with_3_invalid_is_rejected_whole(served: Served, db: str) -> None:
    tag = uuid.uuid4().hex[:6].upper()
    with served.client(PIM) as c:
        r = c.post("/products", json={"data": _thousand(tag)})
    assert r.status_code == 422
    assert _codes(r) == EXPECTED
    assert _count(db, tag) == 0


def test_batch_of_1000_per_entity_saves_997_and_reports_3(served: Served, db: str) -> None:
    tag = uuid.uuid4().hex[:6].upper()
    with served.client(PIM, **{"X-Dx-Transaction": "per-entity"}) as c:
        r = c.post("/products", json={"data": _thousand(tag)})
    assert r.status_code == 207, r.text
    body = r.json()
    assert [(e["code"], e["path"]) for e in body["errors"]] == EXPECTED
    assert len(body["data"]) == 1000
    assert [i for i, row in enumerate(body["data"]) if row is None] == [10, 500, 999]
    assert _count(db, tag) == 997


def _origins(db: str, ids: list[int]) -> list[str]:
    with psycopg.connect(db) as conn:
        return [r[0] for r in conn.execute(
            "SELECT origin FROM dx.outbox WHERE entity = 'public.products' AND "
            "(key->>'id')::int = ANY(%s) ORDER BY (key->>'id')::int", (ids,))]


def test_a_batch_answers_in_request_order_across_statements_and_field_sets(
        served: Served, db: str) -> None:
    """2,500 creates in two field sets (with and without status): more than one multi-row
    INSERT per set, yet every answer row is the row asked for at its index."""
    tag = uuid.uuid4().hex[:6].upper()
    rows = [_product(sku=f"O-{tag}-{i}", price=i, **({"status": "archived"} if i % 3 else {}))
            for i in range(2500)]
    with served.client(PIM) as c:
        r = c.post("/products", json={"data": rows})
    assert r.status_code == 201, r.text[:300]
    data = r.json()["data"]
    assert [(d["sku"], d["price"], d["status"]) for d in data] == [
        (w["sku"], w["price"], w.get("status", "active")) for w in rows]
    assert len({d["id"] for d in data}) == 2500
    assert _origins(db, [d["id"] for d in data]) == ["pim"] * 2500


def test_a_refused_row_leaves_the_others_their_origin(served: Served, db: str) -> None:
    """The batch INSERT is refused as a whole, the rows are retried one by one in a new
    transaction: that one is marked with the key's system again."""
    tag = uuid.uuid4().hex[:6].upper()
    rows = [_product(sku=f"R-{tag}-{i}") for i in range(4)]
    rows[3]["sku"] = rows[1]["sku"]
    with served.client(PIM, **{"X-Dx-Transaction": "per-entity"}) as c:
        r = c.post("/products", json={"data": rows})
    assert r.status_code == 207 and _codes(r) == [("duplicate", "data[3].sku")]
    saved = [d["id"] for d in r.json()["data"] if d is not None]
    assert len(saved) == 3 and _origins(db, saved) == ["pim"] * 3


def test_database_refusals_are_precise_in_both_modes(served: Served, db: str) -> None:
    tag = uuid.uuid4().hex[:6].upper()
    with served.client(PIM) as c:
        taken = c.post("/products", json=_product(sku=f"D-{tag}-0")).json()["data"]
        rows = [_product(sku=f"D-{tag}-{i}") for i in range(1, 6)]
        rows[2]["sku"] = taken["sku"]
        r = c.post("/products", json={"data": rows})
        assert r.status_code == 409 and _codes(r) == [("duplicate", "data[2].sku")]
        r = c.post("/products", json={"data": rows}, headers={"X-Dx-Transaction": "per-entity"})
        assert r.status_code == 207 and _codes(r) == [("duplicate", "data[2].sku")]
        assert [row is None for row in r.json()["data"]] == [False, False, True, False, False]
        r = c.post("/variants", json={"product_id": 2_000_000_000, "sku": f"V-{tag}"})
        assert r.status_code == 409 and _codes(r) == [("foreign_key_violation", "product_id")]


def test_error_codes_and_paths(served: Served) -> None:
    with served.client(PIM) as c:
        pid = c.post("/products", json=_product()).json()["data"]["id"]
        cases = [
            (c.post("/products", content=b"{not json"), 400, [("bad_body", None)]),
            (c.post("/products", json=[1, 2]), 400, [("bad_body", None)]),
            (c.post("/products", json={"data": "x"}), 400, [("bad_body", "data")]),
            (c.post("/products", json=_product(cost=1)), 400, [("unknown_field", "cost")]),
            (c.post("/products", json=_product(price="12")), 422, [("wrong_type", "price")]),
            (c.post("/products", json=_product(price=1.234)), 422, [("wrong_type", "price")]),
            (c.post("/products", json=_product(title="x")), 422, [("min_length", "title")]),
            (c.post("/products", json=_product(sku="A" * 21)), 422, [("max_length", "sku")]),
            (c.post("/products", json=_product(status="gone")), 422, [("enum", "status")]),
            (c.post("/products", json=_product(title=None)), 422,
             [("null_not_allowed", "title")]),
            (c.post("/products", json=_product(id=5)), 422, [("not_creatable", "id")]),
            (c.post("/products", json={"data": [_product(), {"title": "No sku", "price": 1}]}),
             422, [("required", "data[1].sku")]),
            (c.patch(f"/products/{pid}", json={"sku": "OTHER"}), 422,
             [("immutable_field", "sku")]),
            (c.patch(f"/products/{pid}", json={"id": pid + 1}), 422, [("key_mismatch", "id")]),
            (c.patch("/products", json={"data": [{"title": "No id"}]}), 422,
             [("missing_id", "data[0].id")]),
            (c.patch("/products/999999999", json={"title": "Nobody"}), 404,
             [("not_found", None)]),
            (c.get("/products/not-a-number"), 404, [("not_found", "id")]),
            (c.delete("/products"), 405, [("method_not_allowed", None)]),
            (c.post(f"/products/{pid}", json={}), 405, [("method_not_allowed", None)]),
            (c.get("/nothing"), 404, [("not_found", None)]),
            (c.get(f"/products/{pid}", params={"bogus": "1"}), 400,
             [("unknown_field", "bogus")]),
        ]
        for resp, status, codes in cases:
            assert (resp.status_code, _codes(resp)) == (status, codes), (
                resp.request.method, resp.request.url, resp.text)
        # a PATCH that repeats the stored value of an immutable field is fine
        sku = c.get(f"/products/{pid}").json()["data"]["sku"]
        assert c.patch(f"/products/{pid}", json={"sku": sku, "price": 1}).status_code == 200


def test_keys_scopes_and_rate_limit(served: Served) -> None:
    with served.client() as anon:
        r = anon.get("/products")
        assert r.status_code == 401 and _codes(r) == [("unauthorized", None)]
        r = anon.get("/products", headers={"X-Api-Key": "wrong"})
        assert r.status_code == 401
    with served.client(READER) as c:
        assert c.get("/products").status_code == 200
        r = c.post("/products", json=_product())
        assert r.status_code == 403 and _codes(r) == [("forbidden", None)]
    with served.client(WMS_SECRET) as c:
        r = c.get("/products")
        assert r.status_code == 403
        assert c.get("/variants").status_code == 200
    with served.client(**{"Authorization": f"Bearer {PIM}"}) as c:
        p = c.post("/products", json=_product()).json()["data"]
        c.post("/variants", json={"product_id": p["id"], "sku": _sku()})
        r = c.delete(f"/products/{p['id']}")
        assert r.status_code == 409 and _codes(r) == [("has_children", "variants")]
    with served.client(WMS_SECRET) as c:  # write scope on variants, but no delete scope
        v = c.get("/variants", params={"product_id": p["id"]}).json()["data"][0]
        assert c.delete(f"/variants/{v['id']}").status_code == 403
        r = c.get("/products", params={"include": "variants"})
        assert r.status_code == 403
    with served.client(PIM) as c:
        r = c.get("/variants", params={"product_id": p["id"]})
        assert c.delete(f"/variants/{r.json()['data'][0]['id']}").status_code == 200
        assert c.delete(f"/products/{p['id']}").status_code == 200
    with served.client(SLOW_SECRET) as c:
        statuses = [c.get("/variants", params={"limit": "1"}).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]


def test_request_log_names_the_key_never_the_secret(served: Served,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.api.access")
    with served.client(PIM) as c:
        assert c.get("/products", params={"limit": "1"}).status_code == 200
    with served.client("not-a-key") as c:
        assert c.get("/products").status_code == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.api.access"]
    assert any("GET /products 200 key=pim-key" in line for line in lines), lines
    assert any("GET /products 401 key=-" in line for line in lines), lines
    assert not any(PIM in line or "not-a-key" in line for line in lines)


def test_dx_api_check_names_the_line_of_a_bad_entity(db: str, stack: Any,
                                                     tmp_path: Path) -> None:
    good = write_config(tmp_path / "good.yaml", db, stack)
    res = dx("api", "check", "-c", str(good), env=KEYS)
    assert res.returncode == 0, res.stderr
    assert "/products -> public.products" in res.stdout and "api: ok (2 entities" in res.stdout
    text = good.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("title: {column: name, min_length: 2, max_length: 200}",
                                "title: {column: name, min_value: 2}"))
    res = dx("api", "check", "-c", str(bad), env=KEYS)
    line = next(i for i, t in enumerate(bad.read_text().splitlines(), 1) if "title:" in t)
    assert res.returncode == 1
    assert f"bad.yaml:{line}: field 'title': min_value/max_value need a number column" \
        in res.stderr, res.stderr
    bad.write_text(text.replace("table: variants", "table: variantz"))
    res = dx("api", "check", "-c", str(bad), env=KEYS)
    assert res.returncode == 1 and "table public.variantz does not exist" in res.stderr


def test_dx_api_serve_reloads_on_sighup(db: str, stack: Any, tmp_path: Path) -> None:
    path = write_config(tmp_path / "dx.yaml", db, stack)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "api", "serve", "-c",
                             str(path), "--port", str(port)], env={**os.environ, **KEYS},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def health() -> list[str] | None:
            try:
                return list(httpx.get(f"{url}/-/health", timeout=2).json()["entities"])
            except httpx.HTTPError:
                return None

        wait_for(health, 30, what="dx api serve")
        r = httpx.get(f"{url}/variants", headers={"X-Api-Key": READER})
        assert r.status_code == 200
        path.write_text(path.read_text().replace("alias: variants", "alias: items")
                        .replace("entity: variants", "entity: items")
                        .replace("variants: [read, write, delete]", "items: [read]")
                        .replace("scopes: {variants: [read, write]}", "scopes: {items: [read]}"))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: health() == ["items", "products"], 30, what="the reload")
        assert httpx.get(f"{url}/items", headers={"X-Api-Key": READER}).status_code == 200
        path.write_text("api: [not, a, mapping]\n")  # refused: the running API stays
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert health() == ["items", "products"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "reload refused" in out and "dx api: stopped" in out and READER not in out


def test_writes_land_in_the_outbox_with_the_keys_system(served: Served, db: str) -> None:
    with served.client(PIM) as c:
        p = c.post("/products", json=_product()).json()["data"]
        c.patch(f"/products/{p['id']}", json={"price": 3})
    with served.client(WMS_SECRET) as c:
        v = c.post("/variants", json={"product_id": p["id"], "sku": _sku()}).json()["data"]
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT entity, op, origin FROM dx.outbox WHERE (entity = 'public.products' AND "
            "key->>'id' = %s) OR (entity = 'public.variants' AND key->>'id' = %s) ORDER BY id",
            (str(p["id"]), str(v["id"]))).fetchall()
    assert rows == [("public.products", "c", "pim"), ("public.products", "u", "pim"),
                    ("public.variants", "c", "wms")]


def test_openapi_document_docs_and_reload(served: Served, config_path: Path,
                                          tmp_path: Path) -> None:
    with served.client() as c:
        doc = c.get("/openapi.json").json()
        docs = c.get("/docs")
        assert docs.status_code == 200 and "cdn" not in docs.text  # works offline
        assert c.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert {"/products", "/products/{id}", "/variants", "/variants/{id}"} <= set(doc["paths"])
    create = doc["components"]["schemas"]["ProductsCreate"]
    assert create["required"] == ["sku", "title", "price"]
    assert create["properties"]["sku"] == {"type": "string", "maxLength": 20,
                                           "pattern": "^[A-Z0-9-]+$"}
    assert create["properties"]["price"]["minimum"] == 0
    assert "id" not in create["properties"] and create["additionalProperties"] is False
    assert "cost" not in doc["components"]["schemas"]["Products"]["properties"]
    assert "delete" in doc["paths"]["/products/{id}"]

    # a second API over the same database, reloaded from a changed file
    path = tmp_path / "dx.yaml"
    path.write_text(config_path.read_text())
    with serve(path) as other, other.client(ADMIN) as admin:
        path.write_text(config_path.read_text().replace("alias: variants", "alias: items")
                        .replace("entity: variants", "entity: items")
                        .replace("variants: [read, write, delete]", "items: [read]")
                        .replace("scopes: {variants: [read, write]}", "scopes: {items: [read]}"))
        with other.client(PIM) as pim:
            assert pim.post("/-/reload").status_code == 403  # not an admin key
        r = admin.post("/-/reload")
        assert r.status_code == 200, r.text
        assert r.json()["entities"] == ["items", "products"]
        with other.client(PIM) as pim:
            assert pim.get("/items").status_code == 200
            assert pim.get("/variants").status_code == 404
            assert pim.post("/items", json={}).status_code == 403  # scope is read only now
        assert "/items" in admin.get("/openapi.json").json()["paths"]

        path.write_text(config_path.read_text().replace("column: name", "column: nme"))
        r = admin.post("/-/reload")
        assert r.status_code == 422 and _codes(r)[0][0] == "invalid_config"
        assert "column 'nme' does not exist" in r.json()["errors"][0]["message"]
        assert ":" in r.json()["errors"][0]["message"].split(" ")[0]  # file:line
        assert admin.get("/-/health").json()["entities"] == ["items", "products"]


def test_api_section_shape_is_unchanged_by_the_tests() -> None:
    assert "secret_env: TEST_API_KEY_PIM" in API_SECTION  # names, never values, in the file
    assert KEYS["TEST_API_KEY_PIM"] not in API_SECTION
