"""Nothing the caller may not see leaves through an error: a table with hidden canary columns
(a cost price, a note, a supplier) and rules on them (CHECK, NOT NULL, unique, foreign key, a
trigger's exception, a division by zero). PostgreSQL's own texts quote those columns ("Failing
row contains (...)", "Key (name, note_canary)=..."); no API response, access log line or
source-route task (what users export) may carry them."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline.tasks.store import TaskFilter, TaskStore
from tests.integration.test_api_support import KEYS, serve
from tests.integration.test_api_support import write_config as api_config
from tests.integration.test_source_support import create_topic, produce, run_worker
from tests.integration.test_source_support import write_config as source_config

SCHEMA = """
CREATE TABLE suppliers (code text PRIMARY KEY);
INSERT INTO suppliers VALUES ('S1');
CREATE TABLE parts (
    id serial PRIMARY KEY,
    sku text NOT NULL UNIQUE,
    name text NOT NULL,
    price numeric(10, 2) NOT NULL,
    cost_canary numeric(10, 4) NOT NULL DEFAULT 777.4711,
    note_canary text NOT NULL DEFAULT 'CANARY-NOTE',
    supplier_canary text DEFAULT 'S1' REFERENCES suppliers (code),
    CONSTRAINT price_rule CHECK (name <> 'below-cost' OR price > cost_canary),
    UNIQUE (name, note_canary)
);
CREATE FUNCTION parts_rules() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.name = 'drop-cost' THEN NEW.cost_canary := NULL; END IF;
    IF NEW.name = 'orphan' THEN NEW.supplier_canary := 'CANARY-SUPPLIER'; END IF;
    IF NEW.name = 'raise' THEN RAISE EXCEPTION 'refused, cost is %', NEW.cost_canary; END IF;
    IF NEW.name = 'internal' THEN  -- not a row error: the request fails as a whole
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = 'no, cost is ' || NEW.cost_canary;
    END IF;
    IF NEW.name = 'divide' THEN
        NEW.cost_canary := NEW.price / (NEW.cost_canary - 777.4711);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER parts_rules BEFORE INSERT OR UPDATE ON parts
    FOR EACH ROW EXECUTE FUNCTION parts_rules();
INSERT INTO parts (sku, name, price) VALUES ('EXISTING', 'dup', 5);
"""

#: name -> (API status, code, message). 'dup' collides with a hidden-column unique rule.
REFUSED = {
    "below-cost": (422, "check_violation", "the row breaks a check rule of the database"),
    "drop-cost": (422, "null_not_allowed", "a value the database requires is missing (a "
                                           "column that is not exposed has no default)"),
    "orphan": (409, "foreign_key_violation", "the row refers to a row that does not exist"),
    "dup": (409, "duplicate", "another row already has these values (a unique rule of the "
                              "database)"),
    "raise": (422, "invalid_value", "a trigger of the database refused the row"),
    "divide": (422, "invalid_value", "division by zero while computing the row"),
}

API = """
api:
  keys:
    - id: shop
      system: shop
      secret_env: TEST_API_KEY_PIM
      scopes: {"*": [read, write]}
  entities:
    - alias: parts
      table: public.parts
      fields:
        id: {creatable: false, editable: false}
        sku: {}
        name: {}
        price: {}
"""


def assert_no_canary(text: str) -> None:
    assert "canary" not in text.lower() and "777.47" not in text, text


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Every log record the process emits while the test runs."""
    seen: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = seen.append  # type: ignore[method-assign]
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield seen
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


def test_api_errors_never_carry_database_text(pg_db: str, stack: Any, tmp_path: Path,
                                              records: list[logging.LogRecord]) -> None:
    with psycopg.connect(pg_db) as conn:
        conn.execute(SCHEMA)  # type: ignore[arg-type]
    with serve(api_config(tmp_path / "dx.yaml", pg_db, stack, api=API)) as served, \
            served.client(KEYS["TEST_API_KEY_PIM"]) as c:
        for i, (name, (status, code, message)) in enumerate(REFUSED.items()):
            r = c.post("/parts", json={"sku": f"P{i}", "name": name, "price": 1})
            assert r.status_code == status, r.text
            assert r.json()["errors"] == [{"code": code, "message": message}], name
            assert_no_canary(r.text)
        # the same in a batch and per entity: problems at each row's path, still no text
        batch = [{"sku": f"B{i}", "name": n, "price": 1} for i, n in enumerate(REFUSED)]
        for mode in ("request", "per-entity"):
            r = c.post("/parts", json={"data": batch}, headers={"X-Dx-Transaction": mode})
            assert r.status_code in (207, 409, 422), r.text
            assert {e["code"] for e in r.json()["errors"]} == {v[1] for v in REFUSED.values()}
            assert_no_canary(r.text)
        r = c.post("/parts", json={"sku": "I", "name": "internal", "price": 1})
        assert (r.status_code, r.json()["errors"][0]["code"]) == (500, "internal_error")
        assert_no_canary(r.text)
        # an exposed column at fault is named by its API field
        r = c.post("/parts", json={"sku": "EXISTING", "name": "other", "price": 1})
        assert r.json()["errors"] == [{"code": "duplicate", "path": "sku",
                                       "message": "another row already has this sku"}]
    access = [r.getMessage() for r in records if r.name == "pipeline.api.access"]
    assert len(access) >= len(REFUSED) + 4
    for line in access:
        assert_no_canary(line)


def test_source_route_tasks_never_carry_database_text(pg_db: str, stack: Any, tmp_path: Path,
                                                      topic_prefix: str) -> None:
    with psycopg.connect(pg_db) as conn:
        conn.execute(SCHEMA)  # type: ignore[arg-type]
    topic = f"{topic_prefix}.parts"
    create_topic(stack, topic)
    cfg = source_config(tmp_path / "dx.yaml", stack, pg_db, f"""  - name: parts
    topic: {topic}
    format: json
    table: parts
    key: [sku]
    columns: [sku, name, price]
""")
    produce(stack, topic, [({"sku": f"P{i}"}, {"sku": f"P{i}", "name": n, "price": 1})
                           for i, n in enumerate(REFUSED)])
    stats = run_worker(cfg, "parts")
    assert (stats.applied, stats.failed) == (0, len(REFUSED))
    with psycopg.connect(pg_db) as conn:
        exported = list(TaskStore(conn).iter_full(TaskFilter(route="parts")))  # dx tasks export
    assert len(exported) == len(REFUSED)
    for task in exported:
        assert_no_canary(json.dumps(task, default=str))
    assert sorted(t["error"] for t in exported) == \
        sorted(f"{code}: {message}" for _, code, message in REFUSED.values())
