"""Webhooks into a source route through ``dx inbound serve``'s application on a real socket: bad
signatures, replayed timestamps, oversized and malformed bodies are refused with the API's coded
errors and nothing is applied; a re-sent webhook applies once; with the broker unreachable the
answer is 503, never a 2xx, and the same webhook sent again later is accepted and applied."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from prometheus_client import REGISTRY

from pipeline.config.loader import load_config
from pipeline.inbound.webhook import WebhookServer
from tests.integration.test_inbound_support import (
    free_port,
    inbound_config,
    products_table,
    rows,
    wait_for,
    writes,
)
from tests.integration.test_source_support import run_worker

pytestmark = pytest.mark.integration

SECRET = "s3cret-for-tests"
HMAC_HOOK = """      id_fields: [id, seq]
      webhook:
        auth: {kind: hmac, secret: "${DX_TEST_HOOK_SECRET}", header: X-Signature}
        max_body_bytes: 4096
"""
BEARER_HOOK = """      webhook:
        auth: {kind: bearer, token: "${DX_TEST_HOOK_SECRET}"}
        ack_timeout_s: 2
"""


@contextmanager
def serving(config_path: Path) -> Iterator[str]:
    """The webhook application under uvicorn on a free port, in a thread."""
    app = WebhookServer(load_config(config_path), flush_s=0.2)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app.app, host="127.0.0.1", port=port,
                                           log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for("the webhook server", lambda: server.started, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        app.close()


def signed(body: bytes, ts: int | None = None, secret: str = SECRET) -> dict[str, str]:
    t = str(ts if ts is not None else int(time.time()))
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Signature": f"t={t},v1={mac}", "Content-Type": "application/json"}


def product(i: int, seq: int = 1) -> dict[str, Any]:
    return {"id": i, "sku": f"sku-{i}", "name": f"product {i}", "price": f"{i}.25", "seq": seq}


def post(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{url}/inbound/products", content=body, headers=headers, timeout=30)


def codes(resp: httpx.Response) -> list[tuple[str, str | None]]:
    return [(e["code"], e.get("path")) for e in resp.json()["errors"]]


def test_webhook_refuses_bad_requests_and_a_resent_webhook_applies_once(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DX_TEST_HOOK_SECRET", SECRET)
    products_table(pg_db)
    cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products", HMAC_HOOK)
    batch = json.dumps([product(1), product(2), product(3)]).encode()
    with serving(cfg) as url:
        first = post(url, batch, signed(batch))
        assert first.status_code == 202, first.text
        assert first.json()["accepted"] == 3
        again = post(url, batch, signed(batch))  # re-sent: new signature, same entities
        assert again.status_code == 200 and again.json()["status"] == "duplicate"
        one = json.dumps(product(4)).encode()
        keyed = {**signed(one), "Idempotency-Key": "delivery-77"}
        assert post(url, one, keyed).status_code == 202
        other = json.dumps(product(5)).encode()  # same key, other entities: refused, never a
        reused = post(url, other, {**signed(other), "Idempotency-Key": "delivery-77"})  # 2xx
        assert (reused.status_code, codes(reused)) == (422, [("key_mismatch", "Idempotency-Key")])

        refused = json.dumps(product(9)).encode()
        bad_sig = post(url, refused, signed(refused, secret="wrong"))
        assert (bad_sig.status_code, codes(bad_sig)) == (401, [("unauthorized", None)])
        assert "does not match" in bad_sig.text
        replay = post(url, refused, signed(refused, ts=int(time.time()) - 3600))
        assert replay.status_code == 401 and "window" in replay.text
        unsigned = post(url, refused, {"Content-Type": "application/json"})
        assert unsigned.status_code == 401
        big = json.dumps([product(i) for i in range(100, 160)]).encode()
        assert len(big) > 4096
        too_big = post(url, big, signed(big))
        assert (too_big.status_code, codes(too_big)) == (413, [("payload_too_large", None)])

        def chunks() -> Iterator[bytes]:  # no Content-Length: refused while reading
            for _ in range(10):
                yield b" " * 1000
        chunked = httpx.post(f"{url}/inbound/products", content=chunks(),
                             headers=signed(b""), timeout=30)
        assert chunked.status_code == 413
        garbage = b'{"id": 9, "sku": '
        malformed = post(url, garbage, signed(garbage))
        assert (malformed.status_code, codes(malformed)[0][0]) == (400, "bad_body")
        mixed = json.dumps([product(9), "not an entity"]).encode()
        shape = post(url, mixed, signed(mixed))
        assert (shape.status_code, codes(shape)) == (400, [("bad_body", "[1]")])
        empty = b"[]"
        assert post(url, empty, signed(empty)).status_code == 400
        nowhere = httpx.post(f"{url}/inbound/nope", content=one, headers=signed(one))
        assert (nowhere.status_code, codes(nowhere)) == (404, [("not_found", None)])
        wait_for("webhook counters", lambda: _state(pg_db) is not None, 30)
        with psycopg.connect(pg_db, autocommit=True) as conn:  # idempotency claims fail
            conn.execute("ALTER TABLE dx.inbound_request RENAME TO inbound_request_away")
        claim_fails = json.dumps(product(10)).encode()
        broken = post(url, claim_fails, signed(claim_fails))
        assert (broken.status_code, codes(broken)) == (503, [("unavailable", None)])

    stats = run_worker(cfg, "products")
    assert stats.applied == 4 and stats.failed == 0  # nothing refused reached Kafka
    assert sorted(rows(pg_db)) == [1, 2, 3, 4]
    assert set(writes(pg_db).values()) == {1}
    requests, entities, refused_n = _state(pg_db) or (0, 0, 0)
    assert (requests, entities, refused_n) == (3, 4, 10)


def _state(db_url: str) -> tuple[int, int, int] | None:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT requests, entities, refused FROM dx.inbound_state "
                           "WHERE route = 'products' AND kind = 'webhook'").fetchone()
    return None if row is None or row[0] < 3 else (int(row[0]), int(row[1]), int(row[2]))


def test_webhook_with_the_broker_unreachable_answers_503_and_accepts_the_resend(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DX_TEST_HOOK_SECRET", SECRET)
    products_table(pg_db)
    cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products", BEARER_HOOK)
    dead = tmp_path / "dead-broker.yaml"  # the same route, Kafka on a closed port
    dead.write_text(cfg.read_text().replace(stack.kafka_bootstrap, f"127.0.0.1:{free_port()}"))
    body = json.dumps({"data": [product(7), product(8)]}).encode()
    good = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
    with serving(dead) as url:
        wrong = post(url, body, {**good, "Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        down = post(url, body, good)
        assert (down.status_code, codes(down)) == (503, [("unavailable", None)])
        assert down.headers["retry-after"] == "5"
    with psycopg.connect(pg_db) as conn:  # the claim was released: a re-send is not a duplicate
        assert conn.execute("SELECT count(*) FROM dx.inbound_request").fetchone() == (0,)
    topic = f"{topic_prefix}.pim.products"
    labels = {"role": "inbound", "route": "products", "topic": topic}
    before = REGISTRY.get_sample_value("dx_events_delivered_total", labels) or 0
    with serving(cfg) as url:
        resent = post(url, body, good)
        assert resent.status_code == 202, resent.text
        assert REGISTRY.get_sample_value("dx_events_delivered_total", labels) == before + 2
        # no id_fields, no key: the same content again is a new edit (A -> B -> A), not a
        # duplicate to drop with a 2xx
        a, b = json.dumps(product(8)).encode(), json.dumps({**product(8), "name": "B"}).encode()
        assert [post(url, x, good).status_code for x in (a, b, a)] == [202, 202, 202]
    stats = run_worker(cfg, "products")
    assert stats.failed == 0
    assert rows(pg_db) == {7: ("sku-7", "product 7", Decimal("7.25"), 1),
                           8: ("sku-8", "product 8", Decimal("8.25"), 1)}
    assert writes(pg_db)[7] == 1


def test_a_replay_inside_the_window_is_answered_without_producing_but_a_new_edit_is_sent(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DX_TEST_HOOK_SECRET", SECRET)
    products_table(pg_db)
    hook = "\n".join(line for line in HMAC_HOOK.splitlines() if "id_fields" not in line) + "\n"
    cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products", hook)
    a = json.dumps(product(1)).encode()
    b = json.dumps({**product(1), "name": "B"}).encode()
    with serving(cfg) as url:
        first = signed(a, ts=int(time.time()) - 2)
        assert post(url, a, first).status_code == 202
        replayed = post(url, a, first)  # the same signed request again (captured, or retried)
        assert replayed.status_code == 200 and replayed.json()["status"] == "duplicate"
        # the same content signed anew is a new edit back to A, sent
        assert [post(url, x, signed(x)).status_code for x in (b, a)] == [202, 202]
        two = json.dumps(product(2)).encode()  # 8 identical requests at once: one is sent
        keyed = {**signed(two), "Idempotency-Key": "concurrent-1"}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post(url, two, keyed), range(8)))
        assert sorted({a.status_code for a in answers} - {200, 409}) == [202]
        assert [a.status_code for a in answers].count(202) == 1
    run_worker(cfg, "products")
    assert rows(pg_db)[1][1] == "product 1" and writes(pg_db)[2] == 1


def test_dx_inbound_serve_answers_and_a_port_in_use_is_one_error_line(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DX_TEST_HOOK_SECRET", SECRET)
    products_table(pg_db)
    cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products", BEARER_HOOK)
    port = free_port()
    cmd = [sys.executable, "-m", "pipeline.cli", "inbound", "serve", "--port", str(port),
           "-c", str(cfg)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                             text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return first.poll() is not None
        wait_for("dx inbound serve", healthy, 60)
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        body = json.dumps(product(1)).encode()
        ok = post(url, body, {"Authorization": f"Bearer {SECRET}"})
        assert ok.status_code == 202, ok.text
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60,
                                check=False)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"dx: error: cannot listen on 127.0.0.1:{port}: Address already in use "
            "(set --port / DX_INBOUND_PORT)"]
    finally:
        first.terminate()
        assert first.wait(60) == 0  # uvicorn re-raised SIGTERM under dx's handler
    assert "dx inbound: stopped" in (first.stderr.read() if first.stderr else "")
