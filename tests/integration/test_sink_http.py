"""Acceptance of sink workers against the real stack and a real HTTP server playing the
third-party system: every event ends succeeded, dead or skipped as it should, per-key order holds
through retries, dead keys park while other keys flow, retry/skip release them in order, and the
CSV export lists exactly the failures with their reasons."""

from __future__ import annotations

import csv
import io
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_sink_support import (
    EventProducer,
    Req,
    Resp,
    create_topic,
    dx,
    read_topic,
    sink_thread,
    target,
    tasks,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

# (id, seq, behaviour, origin): what the target does with that event, by the 'behaviour' field
EVENTS: list[tuple[int, int, str, str | None]] = [
    (1, 1, "ok", None), (1, 2, "500x2", None), (1, 3, "ok", None),
    (2, 1, "429", None), (2, 2, "ok", None),
    (3, 1, "slow", None), (3, 2, "ok", None),
    (4, 1, "ok", None), (4, 2, "400", None), (4, 3, "ok", None), (4, 4, "ok", None),
    (5, 1, "500", None), (5, 2, "ok", None),
    (6, 1, "ok", "erp"), (6, 2, "ok", None),
    *[(i, s, "ok", None) for i in range(7, 13) for s in (1, 2, 3)],
]
EXPECTED = {  # (id, seq) -> status after the first pass
    (4, 2): "dead", (4, 3): "pending", (4, 4): "pending",
    (5, 1): "dead", (5, 2): "pending", (6, 1): "skipped",
}


class Script:
    def __init__(self) -> None:
        self.healthy = threading.Event()  # once set, the always-failing 500 recovers

    def __call__(self, r: Req, n: int) -> Resp:
        b = (r.json or {}).get("behaviour", "ok")
        if b == "500x2" and n <= 2:
            return Resp(500, '{"error": "db locked"}')
        if b == "429" and n == 1:
            return Resp(429, '{"error": "slow down"}', {"Retry-After": "1"})
        if b == "slow" and n == 1:
            return Resp(200, delay_s=1.5)
        if b == "400":
            return Resp(400, '{"error": "sku missing"}')
        if b == "500" and not self.healthy.is_set():
            return Resp(500, '{"error": "down"}')
        return Resp(200, '{"ok": true}')


def test_scripted_target_outcomes_order_dead_letters_and_export(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic, partitions=3)
    script = Script()
    with target(script) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, f"""
  - name: to-erp
    topics: [{topic}]
    target: erp
    concurrency: 2
    batch_size: 10
    retry: {{max_attempts: 3, backoff_base_s: 0.05, backoff_max_s: 0.2}}
    log: {{detail: full}}
    connector:
      type: http
      url: {srv.url}/products/{{$key.id}}
      method: PUT
      timeout_s: 0.5
""")
        prod = EventProducer(stack, topic, topic_prefix)
        ids: dict[str, tuple[int, int]] = {}
        for seq in range(1, 5):
            for id_, s, behaviour, origin in EVENTS:
                if s == seq:
                    env = prod.send(id_, seq=s, behaviour=behaviour, origin=origin)
                    ids[env["event_id"]] = (id_, s)
        prod.flush()

        def settled() -> list[dict[str, Any]] | None:
            rows = tasks(pg_db, "to-erp")
            done = [r for r in rows if r["status"] in ("succeeded", "dead", "skipped", "pending")]
            return rows if len(done) == len(EVENTS) else None

        with sink_thread(cfg, "to-erp"):
            rows = wait_for(settled, 90, what="every event to reach a verdict")
            status = {ids[r["event_id"]]: r["status"] for r in rows}
            assert status == {(i, s): EXPECTED.get((i, s), "succeeded") for i, s, _, _ in EVENTS}
            by_pos = {ids[r["event_id"]]: r for r in rows}
            assert by_pos[(1, 2)]["attempts"] == 3          # two 500s, then 200
            assert by_pos[(2, 1)]["attempts"] == 1          # 429 is back-pressure, not a failure
            assert by_pos[(3, 1)]["attempts"] == 2          # timed out once
            assert by_pos[(5, 1)]["attempts"] == 3          # retries exhausted
            assert "HTTP 400" in by_pos[(4, 2)]["error"]
            assert "sku missing" in by_pos[(4, 2)]["error"]
            assert by_pos[(4, 2)]["export_log"]["status"] == 400
            assert by_pos[(4, 2)]["import_log"]["mapped"]["behaviour"] == "400"
            assert "gave up after 3 attempts" in by_pos[(5, 1)]["error"]
            assert "echo" in by_pos[(6, 1)]["error"]

            # nothing parked or skipped reached the target; successes arrived in key order
            sent = [(r.json["id"], r.json["seq"]) for r in srv.received() if r.json]
            for parked in [(4, 3), (4, 4), (5, 2), (6, 1)]:
                assert parked not in sent
            assert_key_order(srv.received())

            # dead letters: original message, the error and where it came from in headers
            dlq = read_topic(stack, f"{topic}.dlq", 2)
            assert len(dlq) == 2
            for m in dlq:
                h = {k: v.decode() for k, v in m.headers()}
                dead = next(r for r in rows if r["status"] == "dead"
                            and r["offset"] == int(h["dx.dlq.offset"])
                            and r["partition"] == int(h["dx.dlq.partition"]))
                assert h["dx.dlq.topic"] == topic and h["dx.dlq.route"] == "to-erp"
                assert h["dx.dlq.error"] == dead["error"]
                assert h["dx.event_id"] == dead["event_id"]

            # export lists exactly the failures, with reasons
            out = dx(cfg, "tasks", "export", "--format", "csv", "--route", "to-erp")
            assert out.returncode == 0, out.stderr
            exported = list(csv.DictReader(io.StringIO(out.stdout)))
            assert sorted(ids[e["event_id"]] for e in exported) == [(4, 2), (5, 1)]
            assert {e["http_status"] for e in exported} == {"400", "500"}
            assert all(e["error"] for e in exported)

            # skip the 400: the events parked behind it go, in order
            dead4 = by_pos[(4, 2)]["id"]
            assert dx(cfg, "tasks", "skip", str(dead4)).returncode == 0
            # the target recovers; retry every dead task of the route
            script.healthy.set()
            out = dx(cfg, "tasks", "retry", "--all", "--route", "to-erp", "--status", "dead")
            assert out.returncode == 0 and "1 task(s) queued" in out.stdout, out.stdout

            def released() -> bool:
                st = {ids[r["event_id"]]: r["status"] for r in tasks(pg_db, "to-erp")}
                return all(st[p] == "succeeded" for p in [(4, 3), (4, 4), (5, 1), (5, 2)])

            wait_for(released, 60, what="parked events to be released")
            final = {ids[r["event_id"]]: r["status"] for r in tasks(pg_db, "to-erp")}
            assert final[(4, 2)] == "skipped"
            assert_key_order(srv.received())
            ok = [(r.json["id"], r.json["seq"]) for r in srv.received() if r.status == 200]
            assert [s for i, s in ok if i == 4] == [1, 3, 4]
            assert [s for i, s in ok if i == 5] == [1, 2]


def assert_key_order(received: list[Req]) -> None:
    """Per key, the events the target accepted came in sequence order, each once."""
    accepted: dict[int, list[int]] = defaultdict(list)
    for r in received:
        if r.status == 200 and r.json:
            accepted[r.json["id"]].append(r.json["seq"])
    for key, seqs in accepted.items():
        assert seqs == sorted(set(seqs)), f"key {key} delivered out of order: {seqs}"
