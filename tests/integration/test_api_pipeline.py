"""The full path: a write through the API -> capture (origin = the key's system) -> relay ->
Kafka (Avro, registry) -> an HTTP sink route; the route whose target is the writing system
does not get its own change back. In both capture modes: the API marks its transactions with
the writing system, a trigger-captured row carries it, the change stream carries it as a
transactional message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from tests.integration.relay_support import TopicReader, dx, relay_thread
from tests.integration.test_api_support import API_SECTION, KEYS, SCHEMA, serve, write_config
from tests.integration.test_sink_support import sink_thread, target, tasks, wait_for

TABLES = """
  - name: public.products
    columns: [id, sku, name, price, status, updated_at]
"""


def test_api_write_reaches_kafka_and_an_http_sink_with_its_origin(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path, capture_mode: str) -> None:
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
    topic = f"{topic_prefix}.public.products"
    with target() as srv:
        extra = f"""
capture:
  mode: {capture_mode}
relay:
  name: {topic_prefix}
  poll_interval_s: 0.02
sinks:
  - name: to-erp
    topics: [{topic}]
    target: erp
    connector: {{type: http, url: "{srv.url}/erp/{{$key.id}}", method: PUT}}
  - name: to-pim
    topics: [{topic}]
    target: pim
    log: {{record_skipped: true}}
    connector: {{type: http, url: "{srv.url}/pim/{{$key.id}}", method: PUT}}
"""
        path = write_config(tmp_path / "dx.yaml", pg_db, stack, prefix=topic_prefix,
                            tables="\n" + TABLES, api=API_SECTION + extra)
        res = dx("capture", "install", "-c", str(path))
        assert res.returncode == 0 and f"capture mode: {capture_mode}" in res.stdout, \
            res.stdout + res.stderr

        with serve(path) as api, api.client(KEYS["TEST_API_KEY_PIM"]) as c:
            r = c.post("/products", json={"sku": "PIPE-1", "title": "Piped", "price": 12.5})
            assert r.status_code == 201, r.text
            pid = r.json()["data"]["id"]

        reader = TopicReader(stack, topic)
        with relay_thread(path):
            events = reader.read(until=1, timeout_s=60)
            with sink_thread(path, "to-erp"), sink_thread(path, "to-pim"):
                got = wait_for(lambda: [q for q in srv.received() if q.path.startswith("/erp/")],
                               60, what="the ERP delivery")
                wait_for(lambda: tasks(pg_db, "to-pim"), 60, what="the to-pim task")
        reader.close()

    value = events[0].value
    assert value is not None and value["op"] == "c" and value["origin"] == "pim"
    assert value["after"]["sku"] == "PIPE-1" and events[0].headers["dx.origin"] == b"pim"
    assert got[0].path == f"/erp/{pid}" and got[0].json["sku"] == "PIPE-1"
    assert not [q for q in srv.received() if q.path.startswith("/pim/")]
    (pim_task,) = tasks(pg_db, "to-pim")
    assert pim_task["status"] == "skipped" and "echo" in pim_task["error"]
