"""The operator console in a real browser against the real stack: an operator finds a dead task
on the dashboard, filters to it, reads its export log, retries it once the target recovered and
exports the filter to CSV; pauses and resumes a route; and the server refuses what roles, CSRF
and the login rate limit forbid."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.browser.console_support import ConsoleServer, dx, login
from tests.integration.test_sink_support import (
    EventProducer,
    Req,
    Resp,
    create_topic,
    sink_thread,
    target,
    tasks,
    wait_for,
)
from tests.integration.test_source_support import produce, worker_process

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parents[2] / "docs"
PASSWORD = "correct horse"


def write_config(path: Path, stack: Any, db_url: str, prefix: str, target_url: str) -> Path:
    path.write_text(f"""
database:
  url: {db_url}
kafka:
  bootstrap_servers: {stack.kafka_bootstrap}
  topic_prefix: {prefix}
schema_registry:
  url: {stack.schema_registry_url}
sinks:
  - name: pim
    topics: [{prefix}.public.products]
    concurrency: 1
    retry: {{max_attempts: 1, backoff_base_s: 0.05, backoff_max_s: 0.1}}
    connector: {{type: http, url: "{target_url}/items/{{$key.id}}", method: PUT}}
sources:
  - name: erp-items
    topic: {prefix}.erp.items
    format: json
    origin: erp
    table: items
    columns: [id, name]
    batch_size: 10
    batch_timeout_ms: 200
""")
    return path


def setup(tmp_path: Path, stack: Any, db_url: str, prefix: str, target_url: str) -> Path:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
    cfg = write_config(tmp_path / "dx.yaml", stack, db_url, prefix, target_url)
    dx(cfg, "init")
    dx(cfg, "console", "user", "add", "alice", "--role", "operator", password=PASSWORD)
    return cfg


def test_operator_finds_reads_retries_and_exports_a_dead_task(
        browser: Any, stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)
    up = {"target": False}

    def pim(r: Req, n: int) -> Resp:
        if (r.json or {}).get("behaviour") == "400" and not up["target"]:
            return Resp(400, '{"error": "unknown category", "echo": "password=hunter2"}')
        return Resp()

    with target(pim) as srv:
        cfg = setup(tmp_path, stack, pg_db, topic_prefix, srv.url)
        prod = EventProducer(stack, topic, topic_prefix)
        prod.send(1, behaviour="400", name="Blue chair")
        prod.send(2, name="Red table")
        prod.flush()
        with sink_thread(cfg, "pim"), ConsoleServer(cfg) as console:
            rows = wait_for(lambda: (r := tasks(pg_db, "pim")) and len(r) == 2
                            and {x["status"] for x in r} == {"dead", "succeeded"} and r, 60,
                            what="a dead and a delivered task")
            dead = next(r for r in rows if r["status"] == "dead")
            page = browser.new_page(viewport={"width": 1280, "height": 800},
                                    accept_downloads=True)
            login(page, console.url, "alice", PASSWORD)

            # the dashboard shows the dead task on the route's card
            card = page.locator("#route-pim")
            assert "dead 1" in card.locator(".st.dead").inner_text()
            assert "400" in card.locator(".lasterror").inner_text()
            page.screenshot(path=str(DOCS / "console-dashboard.png"))

            # filter to it: from the card, then by error text; the filter lives in the URL
            card.locator(".st.dead").click()
            page.wait_for_url("**/tasks?*")
            assert "status=dead" in page.url and "route=pim" in page.url
            page.fill("input[name=text]", "400")
            page.click("form.filter button[type=submit]")
            page.wait_for_url("**text=400*")
            listed = page.locator("table.tasks tbody tr")
            assert listed.count() == 1 and str(dead["id"]) in listed.inner_text()
            assert page.locator(".matching").inner_text() == "1 task matches."

            # its page: the export log with the target's answer, credentials masked
            page.click(f"table.tasks a[href='/tasks/{dead['id']}']")
            log_text = page.locator("#export-log").inner_text()
            assert "HTTP status 400" in log_text and "unknown category" in log_text
            assert "hunter2" not in page.content() and "***" in log_text
            page.screenshot(path=str(DOCS / "console-task.png"))

            # the target recovers; retry from the page; the running worker redelivers it
            up["target"] = True
            page.click("#retry")
            assert "queued for retry" in page.locator(".msg").inner_text()
            wait_for(lambda: page.reload() and
                     page.locator("#status").inner_text() == "succeeded", 60,
                     interval=0.5, what="the retried task to succeed")
            audit = page.locator("#audit").inner_text()
            assert "retry" in audit and "alice" in audit
            assert srv.received()[-1].json["name"] == "Blue chair"

            # the CSV of a filter: task columns, then the entity's mapped fields, masked
            page.goto(f"{console.url}/tasks?route=pim")
            with page.expect_download() as got:
                page.click("#csv")
            text = Path(got.value.path()).read_text()
            table = list(csv.DictReader(io.StringIO(text)))
            assert {r["id"] for r in table} == {str(r["id"]) for r in rows}
            row = next(r for r in table if r["id"] == str(dead["id"]))
            assert row["status"] == "succeeded" and row["op"] == "u"
            assert json.loads(row["key"]) == {"id": 1}
            assert row["data.name"] == "Blue chair" and row["data.id"] == "1"
            assert "hunter2" not in text
            page.close()


def test_pause_holds_events_and_resume_delivers_them(
        browser: Any, stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    from pipeline.config.loader import load_config
    from pipeline.status import collect

    topic = f"{topic_prefix}.erp.items"
    create_topic(stack, topic)
    cfg = setup(tmp_path, stack, pg_db, topic_prefix, "http://127.0.0.1:9")

    def items() -> int:
        with psycopg.connect(pg_db) as conn:
            row = conn.execute("SELECT count(*) FROM items").fetchone()
            return int(row[0]) if row else 0

    worker = worker_process(cfg, "erp-items")
    try:
        with ConsoleServer(cfg) as console:
            produce(stack, topic, [({"id": 1}, {"id": 1, "name": "first"})])
            wait_for(lambda: items() == 1, 60, what="the worker to apply the first event")
            page = browser.new_page()
            login(page, console.url, "alice", PASSWORD)
            page.click("#route-erp-items button")
            assert "paused" in page.locator(".msg").inner_text()
            assert page.locator("#route-erp-items .badge").inner_text() == "paused"
            with psycopg.connect(pg_db) as conn:
                st = collect(conn, load_config(cfg))
            assert next(r for r in st.routes if r.name == "erp-items").paused

            time.sleep(2.5)  # the worker re-reads the pause state once a second
            produce(stack, topic, [({"id": i}, {"id": i, "name": f"item {i}"})
                                   for i in range(2, 7)])
            time.sleep(4)
            assert items() == 1, "a paused route applied events"
            assert worker.poll() is None

            page.click("#route-erp-items button")  # resume
            assert "resumed" in page.locator(".msg").inner_text()
            wait_for(lambda: items() == 6, 60, what="the held events after resume")

            # the CLI pauses too, and the open dashboard shows it without a reload
            dx(cfg, "source", "pause", "erp-items")
            page.locator("#route-erp-items .badge").wait_for(timeout=30_000)
            dx(cfg, "source", "resume", "erp-items")
            page.goto(f"{console.url}/audit")
            trail = page.locator("table").inner_text()
            assert "pause" in trail and "resume" in trail and "route source/erp-items" in trail
            assert "cli:" in trail
            page.close()
    finally:
        worker.terminate()
        worker.wait(30)


def test_roles_csrf_and_the_login_rate_limit_are_enforced_by_the_server(
        browser: Any, stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    cfg = setup(tmp_path, stack, pg_db, topic_prefix, "http://127.0.0.1:9")
    dx(cfg, "console", "user", "add", "victor", "--role", "viewer", password=PASSWORD)
    with psycopg.connect(pg_db) as conn:
        row = conn.execute(
            "INSERT INTO dx.task (route, topic, partition, \"offset\", key, status, attempts, "
            "error) VALUES ('pim', 't', 0, 7, '{\"id\": 7}', 'dead', 1, 'HTTP 500') "
            "RETURNING id").fetchone()
    assert row is not None
    task_id = int(row[0])

    def status() -> str:
        with psycopg.connect(pg_db) as conn:
            r = conn.execute("SELECT status FROM dx.task WHERE id = %s", (task_id,)).fetchone()
            return str(r[0]) if r else ""

    with ConsoleServer(cfg) as console:
        base = console.url
        # a viewer sees no retry button, and the server refuses the request anyway
        viewer = browser.new_context()
        page = viewer.new_page()
        login(page, base, "victor", PASSWORD)
        page.goto(f"{base}/tasks/{task_id}")
        assert page.locator("#retry").count() == 0
        csrf = page.locator("form.who input[name=csrf]").get_attribute("value")
        r = page.request.post(f"{base}/tasks/{task_id}/retry", form={"csrf": csrf},
                              max_redirects=0)
        assert r.status == 403 and "operator" in r.text()
        r = page.request.post(f"{base}/api/v1/tasks/{task_id}/retry",
                              headers={"X-CSRF-Token": csrf})
        assert r.status == 403
        assert status() == "dead"
        viewer.close()

        # an operator's form without the CSRF token is refused; with it, it works
        operator = browser.new_context()
        page = operator.new_page()
        login(page, base, "alice", PASSWORD)
        r = page.request.post(f"{base}/tasks/{task_id}/retry", form={}, max_redirects=0)
        assert r.status == 403 and "CSRF" in r.text()
        r = page.request.post(f"{base}/tasks/{task_id}/retry", form={"csrf": "forged"},
                              max_redirects=0)
        assert r.status == 403
        assert status() == "dead"
        page.goto(f"{base}/tasks/{task_id}")
        page.click("#retry")
        assert status() == "pending"
        operator.close()

        # five wrong passwords: the sixth try is refused even with the right password
        guest = browser.new_context()
        page = guest.new_page()
        for _ in range(5):
            page.goto(f"{base}/login")
            page.fill("input[name=name]", "alice")
            page.fill("input[name=password]", "wrong password")
            with page.expect_response(f"{base}/login") as resp:
                page.click("button[type=submit]")
            assert resp.value.status == 401
        page.goto(f"{base}/login")
        page.fill("input[name=name]", "alice")
        page.fill("input[name=password]", PASSWORD)
        with page.expect_response(f"{base}/login") as resp:
            page.click("button[type=submit]")
        assert resp.value.status == 429
        assert "too many failed logins" in page.locator(".error").inner_text()
        guest.close()

        # automation: bearer tokens with roles, the OpenAPI document, docs served locally
        secret = dx(cfg, "console", "token", "add", "ci", "--role", "viewer").strip()
        with httpx.Client(base_url=base, timeout=30) as http:
            auth = {"Authorization": f"Bearer {secret}"}
            listed = http.get("/api/v1/tasks", params={"status": "pending"}, headers=auth)
            assert listed.status_code == 200
            assert [t["id"] for t in listed.json()["tasks"]] == [task_id]
            assert http.post(f"/api/v1/tasks/{task_id}/skip", headers=auth).status_code == 403
            assert http.get("/api/v1/tasks", headers={"Authorization": "Bearer nope"}
                            ).status_code == 401
            doc = http.get("/api/openapi.json").json()
            assert "/api/v1/tasks/{task_id}/{action}" in doc["paths"]
            html = http.get("/api/docs").text
            assert "/api/docs/assets/swagger-ui-bundle.js" in html and "cdn" not in html
            assert http.get("/api/docs/assets/swagger-ui-bundle.js").status_code == 200
            ops = {"Authorization": "Bearer " + dx(cfg, "console", "token", "add", "ops",
                                                   "--role", "operator").strip()}
            done = http.post("/api/v1/tasks:skip", json={"status": ["pending"]}, headers=ops)
            assert done.status_code == 200 and done.json() == {"count": 1, "ids": [task_id]}
            assert status() == "skipped"
            trail = http.get("/api/v1/audit", params={"subject_kind": "task"}, headers=auth)
            assert [a["actor"] for a in trail.json()][:2] == ["token:ops", "alice"]
            exported = http.get("/api/v1/tasks.csv", params={"route": "pim"}, headers=auth)
            assert exported.headers["content-type"].startswith("text/csv")
            assert [r["status"] for r in csv.DictReader(io.StringIO(exported.text))] == \
                ["skipped"]
            assert http.get("/metrics").status_code == 200
            assert http.get("/readyz").json()["status"] == "ready"


def test_an_admin_creates_an_api_entity_and_every_replica_serves_it(
        browser: Any, stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    from tests.integration.test_api_support import KEYS, serve

    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE brands (id serial PRIMARY KEY, name varchar(20) NOT NULL, "
                     "secret text)")
        conn.execute("INSERT INTO brands (name, secret) VALUES ('Acme', 'x')")
    cfg = setup(tmp_path, stack, pg_db, topic_prefix, "http://127.0.0.1:9")
    with cfg.open("a") as f:
        f.write("api:\n  keys:\n    - {id: shop, system: shop, secret_env: TEST_API_KEY_PIM, "
                "scopes: {'*': [read, write]}}\n")
    dx(cfg, "console", "user", "add", "root", "--role", "admin", password=PASSWORD)
    secret = KEYS["TEST_API_KEY_PIM"]
    with serve(cfg) as one, serve(cfg) as two, ConsoleServer(cfg) as console:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        login(page, console.url, "root", PASSWORD)
        page.goto(f"{console.url}/entities/new")
        page.fill("input[name=alias]", "brands")
        # a column that does not exist: refused with the catalog's reason, nothing stored
        page.fill("textarea[name=definition]",
                  "table: public.brands\nfields:\n  id: {creatable: false}\n"
                  "  title: {column: label}\n")
        page.click("#save")
        assert "label" in page.locator("#problems").inner_text()
        page.fill("textarea[name=definition]",
                  "table: public.brands\nfields:\n  id: {creatable: false, editable: false}\n"
                  "  title: {column: name, max_length: 20}\n")
        page.click("#save")
        assert "entity brands created" in page.locator(".msg").inner_text()
        assert "entity create" in page.locator("#audit").inner_text()

        # both replicas serve it within seconds, without a restart; the document follows
        for n, served in enumerate((one, two)):
            with served.client(secret) as http:
                got = wait_for(lambda h=http: (r := h.get("/brands")).status_code == 200 and r,
                               30, interval=0.3, what="the new entity on a replica")
                assert "Acme" in [b["title"] for b in got.json()["data"]]
                assert "secret" not in got.json()["data"][0]  # only exposed fields leave
                made = http.post("/brands", json={"title": f"Globex {n}"})
                assert made.status_code == 201, made.text
                assert "/brands" in http.get("/openapi.json").json()["paths"]
        page.goto(f"{console.url}/entities")
        assert "console" in page.locator("table").inner_text()

        # an API key made on the page: secret shown once, its scope holds, revoking ends it
        page.goto(f"{console.url}/keys")
        page.fill("input[name=id]", "bi")
        page.fill("input[name=system]", "bi")
        page.fill("textarea[name=scopes]", "brands: read")
        page.click("#create-key")
        key = page.locator("#secret").inner_text().strip()
        assert key.startswith("dxk_") and key not in page.locator("#keys").inner_text()
        with one.client(key) as http:
            wait_for(lambda: http.get("/brands").status_code == 200, 30, interval=0.3,
                     what="the new key to work")
            assert http.post("/brands", json={"title": "Initech"}).status_code == 403
            page.once("dialog", lambda d: d.accept())
            page.locator("#keys tr", has_text="bi").locator("button.revoke").click()
            assert "key bi revoked" in page.locator(".msg").inner_text()
            wait_for(lambda: http.get("/brands").status_code == 401, 30, interval=0.3,
                     what="the revoked key to be refused")

        # users from the page: add, change the role, remove; audited
        page.goto(f"{console.url}/users")
        page.fill("form[action='/users/add'] input[name=name]", "vera")
        page.select_option("form[action='/users/add'] select[name=role]", "viewer")
        page.fill("form[action='/users/add'] input[name=password]", PASSWORD)
        page.click("form[action='/users/add'] button")
        assert "user vera added (viewer)" in page.locator(".msg").inner_text()
        row = page.locator("#users tr", has_text="vera")
        row.locator("select[name=role]").select_option("operator")
        row.locator("form[action='/users/role'] button").click()
        assert "user vera is now operator" in page.locator(".msg").inner_text()
        page.locator("#users tr", has_text="vera").locator(
            "form[action='/users/remove'] button").click()
        assert "vera" not in page.locator("#users").inner_text()
        assert "user remove" in page.locator("table").last.inner_text()

        # an operator may not change entities (the server says so, not only the page)
        operator = browser.new_context()
        op_page = operator.new_page()
        login(op_page, console.url, "alice", PASSWORD)
        csrf = op_page.locator("form.who input[name=csrf]").get_attribute("value")
        r = op_page.request.post(f"{console.url}/entities/brands/delete", form={"csrf": csrf},
                                 max_redirects=0)
        assert r.status == 403
        assert op_page.request.get(f"{console.url}/users").status == 403
        operator.close()
        page.close()


def test_over_tls_the_session_cookie_is_secure_httponly_and_samesite(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    import re
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    cfg = setup(tmp_path, stack, pg_db, topic_prefix, "http://127.0.0.1:9")
    with ConsoleServer(cfg, tls=(cert, key)) as console, \
            httpx.Client(base_url=console.url, verify=False, timeout=30) as http:
        page = http.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        r = http.post("/login", data={"csrf": token.group(1), "name": "alice",
                                      "password": PASSWORD, "next": "/"})
        assert r.status_code == 303
        cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("dx_session="))
        flags = {f.strip().lower() for f in cookie.split(";")}
        assert {"secure", "httponly", "samesite=lax"} <= flags
        assert "content-security-policy" in http.get("/").headers
