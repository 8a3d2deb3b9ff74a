"""schemathesis fuzzes the generated OpenAPI document against the running API (real uvicorn,
real PostgreSQL): no 5xx, and every response matches the document (status, content type,
schema)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode, checks  # noqa: E402

from tests.integration.test_api_support import KEYS, SCHEMA, Served, serve, write_config  # noqa: E402

PIM = KEYS["TEST_API_KEY_PIM"]


@pytest.fixture(scope="module")
def fuzz_api(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from tests.conftest import _with_database

    name = f"dxt_apifuzz_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _with_database(stack.database_url, name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SCHEMA)
            conn.execute("INSERT INTO products (sku, name, price) "
                         "SELECT 'F-' || i, 'Fuzz ' || i, i FROM generate_series(1, 20) i")
            conn.execute("INSERT INTO variants (product_id, sku, color) SELECT i, 'FV-' || i, "
                         "'red' FROM generate_series(1, 10) i")
        path: Path = write_config(tmp_path_factory.mktemp("fuzz") / "dx.yaml", url, stack)
        with serve(path) as served:
            yield served
    finally:
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


CHECKS = [checks.not_a_server_error, checks.status_code_conformance,
          checks.content_type_conformance, checks.response_schema_conformance]


def test_openapi_fuzz_no_5xx_and_responses_match(fuzz_api: Served) -> None:
    """Positive and negative cases for every operation (the pytest plugin of schemathesis does
    not run under this pytest, so hypothesis drives each operation's strategy directly)."""
    schema = schemathesis.openapi.from_url(f"{fuzz_api.url}/openapi.json")
    failures: list[str] = []
    operations = 0
    calls: list[int] = []
    for result in schema.get_all_operations():
        op = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(mode))
            @settings(max_examples=15, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case: Any) -> None:
                resp = case.call_and_validate(headers={"X-Api-Key": PIM}, checks=CHECKS)
                calls.append(resp.status_code)

            try:
                run()
            except Exception as err:
                failures.append(f"{op.label} ({mode.value}): {str(err)[:2000]}")
    assert operations >= 14
    assert any(200 <= status < 300 for status in calls), calls
    assert not failures, "\n\n".join(failures)
