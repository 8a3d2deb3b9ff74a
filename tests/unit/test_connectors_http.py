"""The http connector against a real HTTP server on 127.0.0.1: request shape, auth, failure
classes. (No Kafka or PostgreSQL needed, so these are unit tests.)"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from connectors.base import NOT_ATTEMPTED, Backpressure, Record
from connectors.http.configuration import HttpSettings
from connectors.http.connector import HttpConnector, retry_after_seconds
from tests.integration.test_sink_support import Req, Resp, target


def rec(i: int, op: str = "u", key: int | None = None) -> Record:
    return Record(event_id=f"00000000-0000-0000-0000-{i:012d}", op=op, key={"id": key or i},
                  payload={"id": key or i, "name": f"n{i}"}, topic="t", partition=0, offset=i,
                  table="public.products", ts_ms=1_700_000_000_000)


def conn(url: str, **kw: object) -> HttpConnector:
    return HttpConnector(HttpSettings.model_validate({"type": "http", "url": url, **kw}),
                         route="r")


def test_request_carries_idempotency_key_cloudevents_and_templated_url() -> None:
    with target() as srv:
        c = conn(srv.url + "/products/{$key.id}?n={name}", cloudevents=True,
                 methods={"d": "DELETE"}, auth={"kind": "bearer", "token": "tok"})
        outs = c.deliver([rec(1), rec(2, op="d")])
        c.close()
    assert [o.ok for o in outs] == [True, True]
    first, second = srv.received()
    assert (first.method, first.path) == ("POST", "/products/1?n=n1")
    assert first.headers["idempotency-key"] == rec(1).event_id
    assert first.headers["ce-id"] == rec(1).event_id
    assert first.headers["ce-type"] == "dx.public.products.updated"
    assert first.headers["ce-specversion"] == "1.0"
    assert first.headers["authorization"] == "Bearer tok"
    assert first.json == {"id": 1, "name": "n1"}
    assert (second.method, second.body) == ("DELETE", b"")
    assert "tok" not in (outs[0].request or "")  # credentials masked in the export log


def test_hmac_signature_verifies_with_the_shared_secret() -> None:
    with target() as srv:
        c = conn(srv.url + "/hook", auth={"kind": "hmac", "secret": "k3y"})
        assert c.deliver([rec(1)])[0].ok
    req = srv.received()[0]
    parts = dict(p.split("=", 1) for p in req.headers["x-dx-signature"].split(","))
    expected = hmac.new(b"k3y", parts["t"].encode() + b"." + req.body, hashlib.sha256)
    assert parts["v1"] == expected.hexdigest()


def test_oauth2_token_is_fetched_once_and_cached() -> None:
    def script(r: Req, n: int) -> Resp:
        if r.path == "/token":
            assert r.headers["authorization"] == "Basic " + base64.b64encode(b"cid:cs").decode()
            return Resp(body=json.dumps({"access_token": "AT", "expires_in": 3600}))
        return Resp(200 if r.headers.get("authorization") == "Bearer AT" else 401)

    with target(script) as srv:
        c = conn(srv.url + "/x", auth={"kind": "oauth2", "token_url": srv.url + "/token",
                                       "client_id": "cid", "client_secret": "cs"})
        assert all(o.ok for o in c.deliver([rec(1), rec(2), rec(3)]))
    assert [r.path for r in srv.received()] == ["/token", "/x", "/x", "/x"]


@pytest.mark.parametrize(("status", "headers", "kind"), [
    (500, {}, "transient"), (503, {}, "transient"), (408, {}, "transient"),
    (429, {"Retry-After": "2"}, "backpressure"), (503, {"Retry-After": "1"}, "backpressure"),
    (400, {}, "terminal"), (404, {}, "terminal"), (422, {}, "terminal"),
])
def test_failure_classes(status: int, headers: dict[str, str], kind: str) -> None:
    with target(lambda r, n: Resp(status, '{"error": "nope"}', headers)) as srv:
        out = conn(srv.url + "/x").deliver([rec(1)])[0]
    assert out.error is not None and out.status == status
    if kind == "backpressure":
        assert isinstance(out.error, Backpressure) and out.error.retry_after is not None
    else:
        assert out.error.transient == (kind == "transient")
        assert not isinstance(out.error, Backpressure)
    assert "nope" in (out.response or "")


def test_timeout_and_connection_refused_are_transient() -> None:
    with target(lambda r, n: Resp(delay_s=1.0)) as srv:
        out = conn(srv.url + "/x", timeout_s=0.2).deliver([rec(1)])[0]
    assert out.error is not None and out.error.transient and "timeout" in str(out.error)
    out = conn(srv.url + "/x").deliver([rec(1)])[0]  # server is gone now
    assert out.error is not None and out.error.transient


def test_after_a_transient_failure_the_rest_of_the_batch_is_not_attempted() -> None:
    with target(lambda r, n: Resp(500 if r.json["id"] == 2 else 200)) as srv:
        outs = conn(srv.url + "/x").deliver([rec(1), rec(2), rec(3)])
    assert outs[0].ok and outs[1].error is not None and outs[2].error is NOT_ATTEMPTED
    assert len(srv.received()) == 2


def test_after_a_terminal_failure_only_the_same_key_waits() -> None:
    with target(lambda r, n: Resp(400 if r.json["name"] == "n1" else 200)) as srv:
        outs = conn(srv.url + "/x").deliver([rec(1, key=7), rec(2, key=8), rec(3, key=7)])
    assert not outs[0].error.transient  # type: ignore[union-attr]
    assert outs[1].ok and outs[2].error is NOT_ATTEMPTED


def test_bulk_endpoint_sends_one_request() -> None:
    with target() as srv:
        c = conn(srv.url + "/x", bulk={"url": srv.url + "/bulk", "wrap": "items"})
        outs = c.deliver([rec(1), rec(2)])
    assert all(o.ok for o in outs)
    (req,) = srv.received()
    assert req.path == "/bulk" and [i["id"] for i in req.json["items"]] == [1, 2]


def test_retry_after_parsing() -> None:
    assert retry_after_seconds("3") == 3
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 10) == 10
    assert retry_after_seconds("soon") is None


def test_export_log_masks_credentials_in_headers_and_url() -> None:
    import httpx

    from connectors.http.connector import _describe

    request = httpx.Request(
        "POST", "https://user:pa55@erp.example/x?api_key=abc123&page=1",
        headers={"X-Api-Key": "k1", "Ocp-Apim-Subscription-Key": "s1",
                 "Idempotency-Key": "e-1", "Content-Type": "application/json"},
        content=b'{"a":1}')
    text = _describe(request)
    for secret in ("pa55", "abc123", "k1", "s1"):
        assert secret not in text
    assert "idempotency-key: e-1" in text and "page=1" in text and '{"a":1}' in text


def test_bulk_refused_is_split_until_the_bad_record_stands_alone() -> None:
    def script(r: Req, n: int) -> Resp:
        names = [i["name"] for i in r.json]
        return Resp(422, '{"error": "bad name"}') if "n3" in names else Resp(200)

    with target(script) as srv:
        c = conn(srv.url + "/x", bulk={"url": srv.url + "/bulk"})
        batch = [rec(i) for i in range(1, 7)] + [rec(7, key=3)]
        outs = c.deliver(batch)
    assert [o.ok for o in outs[:6]] == [True, True, False, True, True, True]
    assert not outs[2].error.transient  # type: ignore[union-attr]
    assert outs[6].error is NOT_ATTEMPTED  # a later record of the refused key waits
    delivered = [i["id"] for r in srv.received() if r.status == 200 for i in r.json]
    assert sorted(delivered) == [1, 2, 4, 5, 6]


def test_bulk_per_record_results_fail_only_their_record() -> None:
    def script(r: Req, n: int) -> Resp:
        return Resp(207, json.dumps({"results": [
            {"status": 400, "error": "sku"} if i["name"] == "n2" else {"status": 201}
            for i in r.json]}))

    with target(script) as srv:
        c = conn(srv.url + "/x", bulk={"url": srv.url + "/bulk", "results": "results"})
        outs = c.deliver([rec(1), rec(2), rec(3)])
    assert len(srv.received()) == 1
    assert [o.ok for o in outs] == [True, False, True]
    assert "sku" in str(outs[1].error)


def test_every_request_carries_the_position_header() -> None:
    with target() as srv:
        c = conn(srv.url + "/x", cloudevents=True)
        r = Record(**{**rec(1).__dict__, "position": "00000000000000000042"})
        assert c.deliver([r])[0].ok
    req = srv.received()[0]
    assert req.headers["dx-position"] == req.headers["ce-dxposition"] == "00000000000000000042"


def test_timeout_s_bounds_the_whole_request_also_a_dripping_answer() -> None:
    import socket
    import threading
    import time

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    stop = threading.Event()

    def drip() -> None:
        c, _ = srv.accept()
        c.recv(65536)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        while not stop.is_set():  # one byte every 0.2 s: 20 s for the body
            try:
                c.sendall(b"x")
            except OSError:
                break
            time.sleep(0.2)
        c.close()

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    try:
        c = conn(f"http://127.0.0.1:{srv.getsockname()[1]}/x", timeout_s=1)
        started = time.monotonic()
        (out,) = c.deliver([rec(1)])
        took = time.monotonic() - started
    finally:
        stop.set()
        srv.close()
    assert out.error is not None and out.error.transient and "timeout" in str(out.error)
    assert took < 10  # not the 20 s the answer takes


def test_bulk_per_record_results_are_read_when_successes_are_not_logged() -> None:
    """The worker turns ``log_successes`` off (task log detail ``errors``, the default): the
    answer of a 2xx bulk request must still be read, or records the target rejected in its
    per-record results are recorded as delivered."""
    def script(r: Req, n: int) -> Resp:
        return Resp(200, json.dumps({"results": [
            {"status": 400, "error": "sku"} if i["name"] == "n2" else {"status": 201}
            for i in r.json]}))

    with target(script) as srv:
        c = conn(srv.url + "/x", bulk={"url": srv.url + "/bulk", "results": "results"})
        c.log_successes = False
        outs = c.deliver([rec(1), rec(2), rec(3)])
    assert [o.ok for o in outs] == [True, False, True]
    assert "sku" in str(outs[1].error)


def test_a_bulk_request_never_carries_two_records_of_one_key() -> None:
    """Per-key order: with two records of a key in one request, the target could apply the
    later one while the earlier one fails transiently and is retried (and applied) after it.
    The records of a key go in successive requests; after a failure the key's later records
    are not attempted."""
    def script(r: Req, n: int) -> Resp:
        return Resp(200, json.dumps({"results": [
            {"status": 503} if i["name"] == "n1" else {"status": 200} for i in r.json]}))

    with target(script) as srv:
        c = conn(srv.url + "/x", bulk={"url": srv.url + "/bulk", "results": "results"})
        c.log_successes = False
        outs = c.deliver([rec(1, key=7), rec(2, key=8), rec(3, key=7), rec(4, key=8)])
    bodies = [[i["name"] for i in req.json] for req in srv.received()]
    assert bodies == [["n1", "n2"], ["n4"]]  # n3 (key 7) waits for n1
    assert outs[0].error is not None and outs[0].error.transient
    assert outs[1].ok and outs[3].ok and outs[2].error is NOT_ATTEMPTED


def test_a_request_waiting_for_a_connection_is_not_sent_once_the_worker_let_go() -> None:
    """Review: ownership was checked before a request waited for a pooled connection (all
    busy), not after: a request of a revoked partition went out after the hand-over. Now it
    is checked right before the request's first byte."""
    import threading
    import time

    from connectors.base import call_scope

    with target(lambda r, n: Resp(200, delay_s=1.0 if r.path == "/busy" else 0.0)) as srv:
        c = conn(srv.url + "/{$key.id}", max_connections=1, timeout_s=30)
        busy = threading.Thread(target=lambda: c._send(c.client.build_request(
            "POST", srv.url + "/busy")))
        busy.start()
        wait_for_request(srv, 1)
        owned = {"yes": True}
        outcome: list[object] = []

        def late() -> None:
            with call_scope(lambda: owned["yes"]):
                outcome.extend(c.deliver([rec(7)]))

        waiting = threading.Thread(target=late)
        waiting.start()
        time.sleep(0.2)  # waiting for the one connection, held by /busy
        owned["yes"] = False  # the revoke
        busy.join(10)
        waiting.join(10)
        c.close()
    assert [r.path for r in srv.received()] == ["/busy"]
    assert [o.error for o in outcome] == [NOT_ATTEMPTED]  # type: ignore[attr-defined]


def test_timeout_s_bounds_the_wait_for_a_connection_and_the_answer_together() -> None:
    """``timeout_s`` is the whole request: a request that waited for a pooled connection
    has only what is left of it for its answer (each phase used to get all of it)."""
    import threading

    with target(lambda r, n: Resp(200, body="", delay_s=1.5)) as srv:  # no body to time
        c = conn(srv.url + "/{$key.id}", max_connections=1, timeout_s=2)
        first: list[object] = []
        t = threading.Thread(target=lambda: first.extend(c.deliver([rec(1)])))
        t.start()
        wait_for_request(srv, 1)
        second = c.deliver([rec(2)])  # waits ~1.5 s for the connection, then 0.5 s is left
        t.join(10)
        c.close()
    assert [o.ok for o in first] == [True]  # type: ignore[attr-defined]
    assert second[0].error is not None and "timeout" in str(second[0].error)


def wait_for_request(srv: object, n: int) -> None:
    from tests.integration.test_sink_support import wait_for

    wait_for(lambda: len(srv.received()) >= n, 10, interval=0.01,  # type: ignore[attr-defined]
             what=f"{n} request(s) at the target")
