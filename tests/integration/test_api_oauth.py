"""OAuth2 client credentials (RFC 6749 §4.4) on the Data Exchange API against the real
PostgreSQL: POST /oauth/token on a real uvicorn, tokens used over HTTP with httpx."""

from __future__ import annotations

import base64
import logging
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
from tests.integration.test_api_support import (
    BRIEF_SECRET,
    KEYS,
    SCHEMA,
    Served,
    serve,
    write_config,
)

ERP = KEYS["TEST_API_CLIENT_ERP"]
ADMIN = KEYS["TEST_API_KEY_ADMIN"]
TABLES = """
  - name: public.products
    columns: [id, sku, name, price, status, updated_at]
"""


@pytest.fixture(scope="module")
def db(stack: Any) -> Iterator[str]:
    from tests.conftest import _with_database

    name = f"dxt_apioauth_{uuid.uuid4().hex[:10]}"
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
    path = write_config(tmp_path_factory.mktemp("oauth") / "dx.yaml", db, stack,
                        tables="\n" + TABLES)
    cfg = load_config(path)
    with psycopg.connect(db, autocommit=True) as conn:
        capture_install.ensure_schema(conn, cfg)
        capture_install.install_table(conn, cfg, 0)
    return path


@pytest.fixture(scope="module")
def served(config_path: Path) -> Iterator[Served]:
    with serve(config_path) as s:
        yield s


def _basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def _token(s: Served, client_id: str = "erp-client", secret: str = ERP, *,
           basic: bool = True, **form: str) -> httpx.Response:
    data = {"grant_type": "client_credentials", **form}
    headers = {}
    if basic:
        headers["Authorization"] = _basic(client_id, secret)
    else:
        data |= {"client_id": client_id, "client_secret": secret}
    return httpx.post(f"{s.url}/oauth/token", data=data, headers=headers, timeout=30)


def _bearer(s: Served, token: str) -> httpx.Client:
    return s.client(Authorization=f"Bearer {token}")


def _product() -> dict[str, Any]:
    return {"sku": "O-" + uuid.uuid4().hex[:10].upper(), "title": "Token widget", "price": 3}


def test_token_issued_by_basic_and_form_and_used_for_read_and_write(served: Served,
                                                                    db: str) -> None:
    r = _token(served)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert body["scope"] == "*:read products:read products:write"
    assert r.headers["cache-control"] == "no-store"
    token = body["access_token"]
    with _bearer(served, token) as c:
        p = c.post("/products", json=_product())
        assert p.status_code == 201, p.text
        pid = p.json()["data"]["id"]
        assert c.get(f"/products/{pid}").status_code == 200
        assert c.get("/variants").status_code == 200
        r = c.post("/variants", json={"product_id": pid, "sku": "X"})
        assert r.status_code == 403 and "client may not write variants" in r.text
        assert c.delete(f"/products/{pid}").status_code == 403  # no delete scope
        assert c.post("/-/reload").status_code == 403  # clients are never admins
    with psycopg.connect(db) as conn:  # writes carry the client's system as their origin
        origin = conn.execute("SELECT origin FROM dx.outbox WHERE entity = 'public.products' "
                              "AND key->>'id' = %s", (str(pid),)).fetchone()
    assert origin == ("erp",)

    r = _token(served, basic=False)  # client_id/client_secret in the form
    assert r.status_code == 200, r.text
    assert r.json()["access_token"] != token
    with _bearer(served, r.json()["access_token"]) as c:
        assert c.get("/products", params={"limit": "1"}).status_code == 200


def test_token_endpoint_errors_follow_rfc_6749(served: Served) -> None:
    r = _token(served, secret="wrong")
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    assert r.headers["www-authenticate"].startswith("Basic")
    assert _token(served, secret="wrong", basic=False).json()["error"] == "invalid_client"
    assert _token(served, "nobody", ERP).status_code == 401
    r = httpx.post(f"{served.url}/oauth/token", data={"grant_type": "client_credentials"})
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r = _token(served, grant_type="password")
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"
    r = httpx.post(f"{served.url}/oauth/token", data={},
                   headers={"Authorization": _basic("erp-client", ERP)})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = httpx.post(f"{served.url}/oauth/token", json={"grant_type": "client_credentials"},
                   headers={"Authorization": _basic("erp-client", ERP)})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = httpx.post(f"{served.url}/oauth/token",
                   data={"grant_type": "client_credentials", "client_secret": ERP},
                   headers={"Authorization": _basic("erp-client", ERP)})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"  # two methods
    assert httpx.get(f"{served.url}/oauth/token").status_code == 405


def test_scope_narrowing_and_scope_beyond_the_client(served: Served) -> None:
    r = _token(served, scope="products:read")
    assert r.status_code == 200 and r.json()["scope"] == "products:read"
    with _bearer(served, r.json()["access_token"]) as c:
        assert c.get("/products").status_code == 200
        assert c.post("/products", json=_product()).status_code == 403
        assert c.get("/variants").status_code == 403
    for scope in ("products:delete", "*:write", "variants:write", "products:admin", "nope:read",
                  "products"):
        r = _token(served, scope=scope)
        assert r.status_code == 400 and r.json()["error"] == "invalid_scope", (scope, r.text)
    r = _token(served, "brief-client", BRIEF_SECRET, scope="*:read")  # a '*' client may
    assert r.status_code == 200 and r.json()["scope"] == "*:read"


def test_expired_unknown_and_revoked_tokens_are_refused(served: Served, config_path: Path,
                                                        tmp_path: Path) -> None:
    r = _token(served, "brief-client", BRIEF_SECRET)
    assert r.status_code == 200 and r.json()["expires_in"] == 1
    with _bearer(served, r.json()["access_token"]) as c:
        assert c.get("/products", params={"limit": "1"}).status_code == 200
        deadline = time.monotonic() + 10
        while (resp := c.get("/products", params={"limit": "1"})).status_code == 200:
            assert time.monotonic() < deadline, "the token never expired"
            time.sleep(0.1)
        assert resp.status_code == 401 and "expired" in resp.text
        assert 'error="invalid_token"' in resp.headers["www-authenticate"]
    with _bearer(served, "dxat_made-up") as c:
        assert c.get("/products").status_code == 401

    # a reload that removes a client revokes its tokens; other clients' tokens keep working
    path = tmp_path / "dx.yaml"
    path.write_text(config_path.read_text())
    with serve(path) as other, other.client(ADMIN) as admin:
        erp = _token(other).json()["access_token"]
        brief = _token(other, "brief-client", BRIEF_SECRET).json()["access_token"]
        text = config_path.read_text()
        start = text.index("    - id: erp-client")
        path.write_text(text[:start] + text[text.index("    - id: brief-client"):]
                        .replace("token_lifetime_s: 1", "token_lifetime_s: 600"))
        r = admin.post("/-/reload")
        assert r.status_code == 200 and r.json()["clients"] == 1, r.text
        with _bearer(other, erp) as c:
            r = c.get("/products")
            assert r.status_code == 401 and "revoked" in r.text
        assert _token(other).status_code == 401
        brief = _token(other, "brief-client", BRIEF_SECRET).json()["access_token"]
        with _bearer(other, brief) as c:
            assert c.get("/products").status_code == 200


def test_request_log_names_the_client_never_the_secret_or_token(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.api.access")
    token = _token(served).json()["access_token"]
    with _bearer(served, token) as c:
        assert c.get("/products", params={"limit": "1"}).status_code == 200
    assert _token(served, secret="wrong").status_code == 401
    records = [r for r in caplog.records if r.name == "pipeline.api.access"]
    lines = [r.getMessage() for r in records]
    assert any("POST /oauth/token 200 client=erp-client" in line for line in lines), lines
    assert any("GET /products 200 client=erp-client" in line for line in lines), lines
    assert any("POST /oauth/token 401 key=-" in line for line in lines), lines
    for r in records:
        text = r.getMessage() + repr(r.__dict__)
        assert token not in text and ERP not in text


def test_rate_limit_is_per_client(served: Served, config_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "dx.yaml"
    path.write_text(config_path.read_text().replace(
        '      scopes: {products: [read, write], "*": [read]}\n',
        '      scopes: {products: [read, write], "*": [read]}\n'
        "      rate_limit: {requests: 3, per_s: 60}\n"))
    assert path.read_text().count("requests: 3, per_s: 60") == 2  # slow-key's and erp's
    with serve(path) as other:
        token = _token(other).json()["access_token"]  # 1 of 3
        with _bearer(other, token) as c:
            statuses = [c.get("/products", params={"limit": "1"}).status_code
                        for _ in range(3)]
        assert statuses == [200, 200, 429]
        r = _token(other)
        assert r.status_code == 429 and r.json()["error"] == "rate_limited"
        brief = _token(other, "brief-client", BRIEF_SECRET).json()["access_token"]
        with _bearer(other, brief) as c:  # another client has its own bucket
            assert c.get("/products", params={"limit": "1"}).status_code == 200


def test_openapi_documents_oauth2_client_credentials(served: Served) -> None:
    with served.client() as c:
        doc = c.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["apiKey"]["type"] == "apiKey"
    flow = schemes["oauth2"]["flows"]["clientCredentials"]
    assert flow["tokenUrl"] == "/oauth/token"
    assert {"products:read", "products:write", "products:delete", "variants:read",
            "*:read"} <= set(flow["scopes"])
    assert {"oauth2": []} in doc["security"]
