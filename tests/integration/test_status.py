"""``dx status`` against the real stack: it shows a transaction that holds captured changes open,
a route that lags with no worker running and a route with a dead letter, and exits non-zero; it
reports an unreachable Kafka (and a database without the task table) as problems, not crashes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline.capture import install as capture_install
from pipeline.config.loader import load_config
from tests.integration.relay_support import dx, execute, relay_thread, write_config
from tests.integration.test_sink_support import Req, Resp, sink_thread, target, tasks, wait_for

pytestmark = pytest.mark.integration

TABLES = "  - name: items\n    columns: [id, v]\n"


def sinks(url: str, topic: str) -> str:
    return f"""
sinks:
  - name: deliver
    topics: [{topic}]
    retry: {{max_attempts: 2, backoff_base_s: 0.05, backoff_max_s: 0.1}}
    connector: {{type: http, url: "{url}/items/{{$key.id}}"}}
  - name: lagging
    topics: [{topic}]
    connector: {{type: http, url: "{url}/elsewhere/{{$key.id}}"}}
"""


def outbox_rows(db: str) -> int:
    with psycopg.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM dx.outbox").fetchone()[0])  # type: ignore[index]


def test_status_shows_long_transaction_lagging_route_and_dead_letters(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    execute(pg_db, "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
    topic = f"{topic_prefix}.public.items"

    def script(r: Req, n: int) -> Resp:  # item 1 is refused for good: its task goes dead
        return Resp(400, '{"error": "bad item"}') if r.path == "/items/1" else Resp(200)

    with target(script) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, TABLES,
                           extra=sinks(srv.url, topic))
        res = dx("capture", "install", "-c", str(cfg))
        assert res.returncode == 0, res.stderr
        execute(pg_db, "INSERT INTO items (id) SELECT g FROM generate_series(1, 5) g")
        with relay_thread(cfg):
            wait_for(lambda: outbox_rows(pg_db) == 0, 60, what="the relay to publish 5 events")
        with sink_thread(cfg, "deliver"):
            wait_for(lambda: sorted(t["status"] for t in tasks(pg_db, "deliver")) ==
                     ["dead"] + ["succeeded"] * 4, 60, what="4 deliveries and 1 dead task")

    long_txn = psycopg.connect(pg_db, application_name="stuck-writer")
    try:
        long_txn.execute("INSERT INTO items (id) VALUES (100)")
        pid = long_txn.info.backend_pid

        def reported() -> Any:
            res = dx("status", "-c", str(cfg), "--json", "--long-txn-s", "1")
            report = json.loads(res.stdout)
            held = [t["pid"] for t in report["relay"]["open_transactions"]
                    if t["holds_captured_changes"]]
            return (res, report) if held == [pid] else None

        res, report = wait_for(reported, 30, interval=0.5, what="the long transaction")
        assert res.returncode == 1
        assert report["healthy"] is False
        routes = {r["name"]: r for r in report["routes"]}
        assert routes["deliver"]["tasks"] == {"dead": 1, "succeeded": 4}
        assert routes["deliver"]["dead"] == 1
        # everything consumed: only the relay's transaction marker is left after the offset
        assert routes["deliver"]["lag"] == 0
        assert routes["lagging"]["lag"] >= 5 and routes["lagging"]["members"] == 0
        assert routes["lagging"]["tasks"] == {}
        problems = "\n".join(report["problems"])
        assert f"transaction pid {pid} (stuck-writer) has held captured changes" in problems
        assert "route lagging (sink): " in problems and "no worker is running" in problems
        assert "route deliver (sink): 1 dead task(s)" in problems
        assert "route deliver (sink): " not in problems.replace(
            "route deliver (sink): 1 dead", "")  # no lag problem for the caught-up route

        text = dx("status", "-c", str(cfg), "--long-txn-s", "1")
        assert text.returncode == 1
        for shown in ("long transactions", "stuck-writer", "lagging", "deliver",
                      "problem: transaction pid", "no worker is running", "1 dead task(s)"):
            assert shown in text.stdout, (shown, text.stdout)
        assert "Traceback" not in text.stderr
    finally:
        long_txn.rollback()
        long_txn.close()


def test_status_reports_unreachable_kafka_and_missing_task_table(
        stack: Any, pg_db: str, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, "unreachable", "  []\n",
                       extra=sinks("http://127.0.0.1:9", "unreachable.public.items"))
    cfg.write_text(cfg.read_text().replace(stack.kafka_bootstrap, "127.0.0.1:1"))
    with psycopg.connect(pg_db, autocommit=True) as conn:
        capture_install.ensure_schema(conn, load_config(cfg))  # the outbox, no task table

    res = dx("status", "-c", str(cfg), "--json", "--kafka-timeout-s", "1")
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    report = json.loads(res.stdout)
    assert report["kafka"]["reachable"] is False
    assert report["problems"] == [
        f"{report['kafka']['error']}; consumer lag unknown"]
    assert report["kafka"]["error"].startswith("kafka unreachable at 127.0.0.1:1")
    assert [(r["name"], r["lag"], r["tasks"]) for r in report["routes"]] == [
        ("deliver", None, {}), ("lagging", None, {})]
