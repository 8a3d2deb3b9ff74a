"""Sink findings of a review (wave 2), each against the real stack and a real HTTP target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_sink_support import (
    EventProducer,
    Req,
    Resp,
    create_topic,
    sink_thread,
    target,
    tasks,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration


def test_a_retried_bulk_request_carries_the_same_idempotency_key(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    """A bulk target that de-duplicates by ``Idempotency-Key`` must see the retry of a batch
    as a retry: the key is derived from the batch's event ids, and the batch is retried whole
    (its keys back off together, so jitter does not split it into other batches with other
    keys)."""
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)
    calls = {"n": 0}

    def script(r: Req, n: int) -> Resp:
        calls["n"] += 1
        return Resp(503, '{"error": "busy"}') if calls["n"] <= 2 else Resp(200)

    with target(script) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, f"""
  - name: bulk
    topics: [{topic}]
    concurrency: 1
    retry: {{backoff_base_s: 0.3, jitter: 1}}
    connector: {{type: http, url: "{srv.url}/x", bulk: {{url: "{srv.url}/bulk"}}}}
""")
        prod = EventProducer(stack, topic, topic_prefix)
        for k in range(20):
            prod.send(k, seq=1)
        prod.flush()
        with sink_thread(cfg, "bulk"):
            wait_for(lambda: len(tasks(pg_db, "bulk")) == 20
                     and all(t["status"] == "succeeded" for t in tasks(pg_db, "bulk")),
                     60, what="every event delivered")
    sent = [(r.headers["idempotency-key"], sorted(i["id"] for i in r.json)
             if isinstance(r.json, list) else [r.path, r.json["id"]]) for r in srv.received()]
    assert len(sent) == 3, sent  # one batch, sent three times (two refusals)
    assert {key for key, _ in sent} == {sent[0][0]}
    assert all(ids == list(range(20)) for _, ids in sent)
