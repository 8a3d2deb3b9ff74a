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


def test_keys_of_two_topics_that_collide_are_two_keys(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    """A route reading products and orders: product 1 and order 1 have the same key text. A
    dead product 1 used to park order 1 too (its events recorded ``pending`` behind a task of
    another entity); now each topic's key has its own order and parking, and the redrive of
    product 1 does not pick up order 1."""
    products, orders = f"{topic_prefix}.public.products", f"{topic_prefix}.public.orders"
    for t in (products, orders):
        create_topic(stack, t)
    refused: set[str] = set()

    def script(r: Req, n: int) -> Resp:
        if r.headers["idempotency-key"] in refused:
            return Resp(400, '{"error": "refused"}')
        return Resp(200)

    with target(script) as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, f"""
  - name: two
    topics: [{products}, {orders}]
    concurrency: 2
    retry: {{backoff_base_s: 0.05}}
    connector: {{type: http, url: "{srv.url}/items/{{$key.id}}"}}
""")
        prod_p, prod_o = EventProducer(stack, products, topic_prefix), \
            EventProducer(stack, orders, topic_prefix)
        refused.add(prod_p.send(1, seq=1)["event_id"])
        prod_p.flush()

        def by_topic() -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for t in tasks(pg_db, "two"):
                out.setdefault(t["topic"], []).append(t["status"])
            return out

        with sink_thread(cfg, "two"):
            wait_for(lambda: by_topic().get(products) == ["dead"], 60, what="product 1 dead")
            prod_o.send(1, seq=1)
            prod_o.flush()
            prod_p.send(1, seq=2)
            prod_p.flush()
            wait_for(lambda: by_topic() == {products: ["dead", "pending"],
                                            orders: ["succeeded"]}, 60,
                     what="order 1 delivered, product 1 parked")
            prod_o.send(1, seq=2)
            prod_o.flush()
            wait_for(lambda: by_topic()[orders] == ["succeeded", "succeeded"], 60,
                     what="order 1's next event delivered")
    assert by_topic()[products] == ["dead", "pending"]
