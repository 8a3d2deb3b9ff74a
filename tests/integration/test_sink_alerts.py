"""Alerts to a real SMTP server (aiosmtpd) and a real webhook receiver: one notification per
incident, none while it persists, one on recovery; a restarted evaluator does not repeat them."""

from __future__ import annotations

import socket
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from pipeline.alerts.engine import AlertEngine
from pipeline.config.alerts import AlertsConfig
from pipeline.config.loader import load_config
from pipeline.db import connect
from pipeline.tasks.store import TaskFilter, TaskRow, TaskStore, ensure_schema
from pipeline.tasks.writer import TaskWriter
from tests.integration.test_sink_support import (
    EventProducer,
    Resp,
    create_topic,
    target,
    write_config,
)

pytestmark = pytest.mark.integration


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_one_alert_per_incident_then_one_recovery(stack: Any, pg_db: str, topic_prefix: str,
                                                  tmp_path: Path) -> None:
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)
    inbox = Inbox()
    smtp = Controller(inbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        with target() as hook:
            cfg = load_config(write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, f"""
  - name: to-erp
    topics: [{topic}]
    connector: {{type: http, url: "{hook.url}/never"}}
"""))
            alerts = AlertsConfig.model_validate({
                "email": {"host": "127.0.0.1", "port": smtp.port, "starttls": False,
                          "from_addr": "dx@shop.test", "to": ["ops@shop.test"]},
                "webhook": {"url": f"{hook.url}/alerts", "headers": {"X-Token": "t0k"}},
                "rules": {"dead_tasks": 1, "consumer_lag": 10, "backlog_age_s": 600,
                          "failure_rate": {"threshold": 0.5, "min_tasks": 2}}})
            engine = AlertEngine(cfg, alerts)
            assert engine.evaluate_once() == []  # healthy: nothing to say

            # an outage: three dead tasks and a backlog of 20 unconsumed messages
            with connect(pg_db, autocommit=True) as conn:
                ensure_schema(conn)
            writer = TaskWriter(pg_db)
            writer.start()
            for i in range(3):
                writer.put(TaskRow(route="to-erp", topic=topic, partition=0, offset=i,
                                   status="dead", key=f'{{"id":{i}}}', error="HTTP 400"))
            writer.flush()
            writer.close()
            prod = EventProducer(stack, topic, topic_prefix)
            for i in range(20):
                prod.send(i)
            prod.flush()

            fired = engine.evaluate_once()
            assert sorted(f.split(":")[0] for f in fired) == [
                "FIRING consumer_lag to-erp", "FIRING dead_tasks to-erp",
                "FIRING failure_rate to-erp"]
            assert engine.evaluate_once() == []                 # still failing: no repeat
            assert AlertEngine(cfg, alerts).evaluate_once() == []  # nor after a restart
            assert len(inbox.messages) == 3
            subjects = sorted(m["Subject"] for m in inbox.messages)
            assert subjects[1] == "[dx] FIRING: dead_tasks to-erp"
            assert "3 dead task(s)" in inbox.messages[[m["Subject"] for m in inbox.messages]
                                                      .index(subjects[1])].get_payload()
            posted = [r for r in hook.received() if r.path == "/alerts"]
            assert len(posted) == 3 and all(r.headers["x-token"] == "t0k" for r in posted)
            assert {r.json["state"] for r in posted} == {"firing"}

            # recovery: the dead tasks are dealt with, the group catches up
            with connect(pg_db) as conn:
                TaskStore(conn).skip(TaskFilter(route="to-erp"))
            from confluent_kafka import Consumer, TopicPartition

            c = Consumer({"bootstrap.servers": stack.kafka_bootstrap,
                          "group.id": "dx-sink-to-erp"})
            c.commit(offsets=[TopicPartition(topic, 0, 20)], asynchronous=False)
            c.close()
            resolved = engine.evaluate_once()
            # (skipped tasks are resolved ones: the failure rate in the window drops to 0)
            assert sorted(f.split(":")[0] for f in resolved) == [
                "RESOLVED consumer_lag to-erp", "RESOLVED dead_tasks to-erp",
                "RESOLVED failure_rate to-erp"]
            assert engine.evaluate_once() == []
            assert len(inbox.messages) == 6
            assert sum("RESOLVED" in m["Subject"] for m in inbox.messages) == 3
            posted = [r for r in hook.received() if r.path == "/alerts"]
            assert [r.json["state"] for r in posted].count("resolved") == 3
    finally:
        smtp.stop()


def test_alerts_name_route_tasks_and_command_reach_their_recipients_despite_a_dead_channel(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    """Issue 12: rules for source routes too; recipients per route and per rule; a failing
    channel (a webhook that refuses) never stops the others and is retried; ``starttls``
    defaults to ``auto`` (a plain local SMTP server works); each mail names the route, the
    count, the first task ids, keys and reasons and the ``dx tasks`` command; the webhook
    document carries the route."""
    inbox = Inbox()
    smtp = Controller(inbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    broken = {"on": True}
    try:
        with target(lambda r, n: Resp(500 if broken["on"] else 200)) as hook:
            path = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, f"""
  - name: to-erp
    topics: [{topic_prefix}.x]
    connector: {{type: http, url: "{hook.url}/never"}}
""", extra=f"""
sources:
  - name: from-pim
    topic: {topic_prefix}.pim.items
    format: json
    table: items
    columns: [id]
""")
            cfg = load_config(path)
            alerts = AlertsConfig.model_validate({
                "email": {"host": "127.0.0.1", "port": smtp.port, "from_addr": "dx@shop.test",
                          "to": ["ops@shop.test"]},
                "webhook": {"url": f"{hook.url}/hook"},
                "recipients": [{"routes": ["from-pim"], "email": ["pim-team@shop.test"]},
                               {"rules": ["dead_tasks"], "routes": ["to-erp"],
                                "email": ["erp-team@shop.test"]}],
                "rules": {"dead_tasks": 1, "backlog_age_s": None, "target_down": False}})
            with connect(pg_db, autocommit=True) as conn:
                ensure_schema(conn)
            writer = TaskWriter(pg_db)
            writer.start()
            for i in range(7):
                writer.put(TaskRow(route="to-erp", topic="t", partition=0, offset=i,
                                   status="dead", key=f'{{"id":{i}}}', error=f"HTTP 400: sku {i}"))
            writer.put(TaskRow(route="from-pim", topic="t", partition=0, offset=0,
                               status="dead", key="[9]", error="field 'id': is null"))
            writer.flush()
            writer.close()
            engine = AlertEngine(cfg, alerts)
            fired = engine.evaluate_once()
            assert sorted(f.split(":")[0] for f in fired) == [
                "FIRING dead_tasks from-pim", "FIRING dead_tasks to-erp"]
            mails = {m["Subject"]: m for m in inbox.messages}
            erp = mails["[dx] FIRING: dead_tasks to-erp"]
            recipients = sorted(m["To"] for m in inbox.messages)
            assert recipients == ["erp-team@shop.test", "ops@shop.test", "ops@shop.test",
                                  "pim-team@shop.test"]
            text = erp.get_payload()
            assert "route:   to-erp" in text and "count:   7" in text
            assert '"id":0' in text and "HTTP 400: sku 4" in text and "sku 5" not in text
            assert "dx tasks list --route to-erp --status dead" in text
            assert "field 'id': is null" in mails["[dx] FIRING: dead_tasks from-pim"].get_payload()
            # the webhook refused: the mails went anyway; it is retried, not forgotten
            assert len([r for r in hook.received() if r.path == "/hook"]) == 2
            broken["on"] = False
            assert engine.evaluate_once() == []
            posted = [r for r in hook.received() if r.path == "/hook" and r.status == 200]
            assert sorted(r.json["route"] for r in posted) == ["from-pim", "to-erp"]
            assert all(r.json["tasks"] and r.json["command"] for r in posted)
            engine.evaluate_once()
            assert len([r for r in hook.received() if r.path == "/hook"]) == 4  # once each
    finally:
        smtp.stop()



def test_an_incident_whose_channels_are_all_down_does_not_hold_up_the_others(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    """Recipients per route: route a's only channel refuses, route b's works. b's alert used
    to wait for a's channel (the evaluation stopped at a's failure); now it goes, and a's is
    sent once its channel answers."""
    down = {"on": True}
    with target(lambda r, n: Resp(500 if r.path == "/a" and down["on"] else 200)) as hook:
        routes = "".join(f"""
  - name: {name}
    topics: [{topic_prefix}.{name}]
    connector: {{type: http, url: "{hook.url}/never"}}
""" for name in ("a", "b"))
        cfg = load_config(write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, routes))
        alerts = AlertsConfig.model_validate({
            "recipients": [{"routes": [name], "webhook": {"url": f"{hook.url}/{name}"}}
                           for name in ("a", "b")],
            "rules": {"dead_tasks": 1, "backlog_age_s": None, "target_down": False}})
        with connect(pg_db, autocommit=True) as conn:
            ensure_schema(conn)
        writer = TaskWriter(pg_db)
        writer.start()
        for name in ("a", "b"):
            writer.put(TaskRow(route=name, topic="t", partition=0, offset=0, status="dead",
                               key='{"id":1}', error="HTTP 400"))
        writer.flush()
        writer.close()
        engine = AlertEngine(cfg, alerts)
        assert [f.split(":")[0] for f in engine.evaluate_once()] == ["FIRING dead_tasks b"]
        down["on"] = False
        assert [f.split(":")[0] for f in engine.evaluate_once()] == ["FIRING dead_tasks a"]
    delivered = [r.path for r in hook.received() if r.status == 200]
    assert delivered == ["/b", "/a"]
