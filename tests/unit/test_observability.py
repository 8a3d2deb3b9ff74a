"""Worker observability: metrics, the /metrics /healthz /readyz server, log redaction, tracing."""

from __future__ import annotations

import io
import json
import logging
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry

from pipeline.observability import tracing
from pipeline.observability.logging import redact, setup_logging
from pipeline.observability.metrics import DxMetrics
from pipeline.observability.server import WorkerServer, port_from_env


@pytest.fixture
def metrics() -> DxMetrics:
    return DxMetrics(CollectorRegistry())


def sample(m: DxMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


# -- metrics ------------------------------------------------------------------------------


def test_worker_metrics_bind_labels(metrics: DxMetrics) -> None:
    sink = metrics.worker("sink", "pim-products")
    sink.received("dx.public.products", 3)
    sink.delivered("dx.public.products", 2)
    sink.failed("transient")
    sink.retried()
    sink.dead_lettered()
    sink.skipped("origin")
    sink.batch(3, 0.02)
    sink.lag("dx.public.products", 0, 7)
    with sink.timed_call():
        pass
    sink.latency_since(time.time() * 1000 - 1500)

    lbl = {"role": "sink", "route": "pim-products"}
    assert sample(metrics, "dx_events_received_total", **lbl, topic="dx.public.products") == 3
    assert sample(metrics, "dx_events_delivered_total", **lbl, topic="dx.public.products") == 2
    assert sample(metrics, "dx_event_failures_total", **lbl, kind="transient") == 1
    assert sample(metrics, "dx_event_retries_total", **lbl) == 1
    assert sample(metrics, "dx_dead_letters_total", **lbl) == 1
    assert sample(metrics, "dx_events_skipped_total", **lbl, reason="origin") == 1
    assert sample(metrics, "dx_batch_size_sum", **lbl) == 3
    assert sample(metrics, "dx_batch_duration_seconds_count", **lbl) == 1
    assert sample(metrics, "dx_target_call_duration_seconds_count", **lbl) == 1
    assert sample(metrics, "dx_consumer_lag_messages", **lbl,
                  topic="dx.public.products", partition="0") == 7
    latency = sample(metrics, "dx_event_latency_seconds_sum", **lbl)
    assert latency is not None and 1.4 < latency < 60

    sink.forget_partition("dx.public.products", 0)
    sink.forget_partition("dx.public.products", 0)  # revoked twice: no error
    assert sample(metrics, "dx_consumer_lag_messages", **lbl,
                  topic="dx.public.products", partition="0") is None


def test_relay_gauges(metrics: DxMetrics) -> None:
    relay = metrics.relay("default")
    relay.active(True)
    relay.backlog(120, 4.5)
    relay.blocking_transaction(0)
    relay.delivered("dx.public.orders", 5)
    assert sample(metrics, "dx_relay_active", relay="default") == 1
    assert sample(metrics, "dx_relay_backlog_events", relay="default") == 120
    assert sample(metrics, "dx_relay_oldest_pending_age_seconds", relay="default") == 4.5
    assert sample(metrics, "dx_events_delivered_total", role="relay", route="default",
                  topic="dx.public.orders") == 5


def test_metric_names_follow_conventions(metrics: DxMetrics) -> None:
    metrics.set_build("1.2.3")
    for family in metrics.registry.collect():
        assert family.name.startswith("dx_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_size")), family.name
    assert sample(metrics, "dx_build_info", version="1.2.3") == 1


# -- server -------------------------------------------------------------------------------


def test_server_endpoints(metrics: DxMetrics) -> None:
    with WorkerServer.on_free_port(registry=metrics.registry) as server:
        assert server.enabled and server.port > 0
        base = server.url
        metrics.worker("source", "erp").delivered("erp.products", 4)
        with httpx.Client(base_url=str(base), timeout=5) as client:
            scrape = client.get("/metrics")
            assert scrape.status_code == 200
            assert ('dx_events_delivered_total{role="source",route="erp",topic="erp.products"} '
                    '4.0') in scrape.text
            assert client.get("/healthz").status_code == 200

            not_ready = client.get("/readyz")
            assert not_ready.status_code == 503
            assert not_ready.json()["reason"] == "starting"

            server.set_ready(True, "assigned 3 partitions")
            assert client.get("/readyz").status_code == 200

            server.set_ready(False, "stopping")
            assert client.get("/readyz").json() == {"status": "not ready", "reason": "stopping"}
            assert client.get("/nope").status_code == 404

            server.set_standby("lease held by relay-7f9")
            strict = client.get("/readyz")
            assert strict.status_code == 503
            assert strict.json() == {"status": "standby", "reason": "lease held by relay-7f9"}
            assert client.get("/readyz?standby=ok").status_code == 200
            server.set_ready(False, "stopping")
            assert client.get("/readyz?standby=ok").status_code == 503
    assert not server.enabled
    server.close()  # twice is fine


def test_stalled_main_loop_is_unhealthy_and_unready(metrics: DxMetrics) -> None:
    with WorkerServer.on_free_port(registry=metrics.registry,
                                   heartbeat_timeout_s=0.05) as server:
        server.set_ready(True)
        time.sleep(0.1)
        with httpx.Client(base_url=str(server.url), timeout=5) as client:
            health = client.get("/healthz")
            assert health.status_code == 503 and health.json()["status"] == "stalled"
            assert client.get("/readyz").json()["reason"] == "main loop stalled"
            server.heartbeat()
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200
            server.set_standby()
            time.sleep(0.1)
            assert client.get("/readyz?standby=ok").status_code == 503


def test_port_zero_disables_but_keeps_the_api() -> None:
    server = WorkerServer(0)
    server.set_ready(True, "x")
    server.heartbeat()
    assert not server.enabled and server.url is None and server.port == 0
    assert server.readiness()[0]
    server.close()


def test_port_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DX_METRICS_PORT", raising=False)
    assert port_from_env(9400) == 9400
    monkeypatch.setenv("DX_METRICS_PORT", "0")
    assert port_from_env(9400) == 0
    monkeypatch.setenv("DX_METRICS_PORT", "http")
    with pytest.raises(ValueError, match="DX_METRICS_PORT"):
        port_from_env()


# -- logging ------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "leaked"), [
    ("connect postgresql://dx:s3cr3t@db:5432/shop failed", "s3cr3t"),
    ("postgresql://dx:p@ss@db/shop", "p@ss"),
    ("host=db user=dx password=hunter2 dbname=shop", "hunter2"),
    ("PGPASSWORD=hunter2", "hunter2"),
    ("Authorization: Bearer eyJhbGciOi.abc", "eyJhbGciOi"),
    ("headers={'Authorization': 'Basic dXNlcjpwdw==', 'Accept': 'json'}", "dXNlcjpwdw"),
    ('{"api_key": "k-123"}', "k-123"),
    # webhook URLs whose path is the credential, and signed / keyed query strings
    ("POST https://hooks.slack.com/services/T0AB12CD/B0EF34GH/xoxbSECRETtoken42 -> 500",
     "xoxbSECRETtoken42"),
    ("url=https://discord.com/api/webhooks/112233445566/Abc-SECRET_tok3n retry",
     "Abc-SECRET_tok3n"),
    ("https://acme.webhook.office.com/webhookb2/a1b2@c3d4/IncomingWebhook/f00dSECRET/e5f6",
     "f00dSECRET"),
    ("https://chat.acme.io/hooks/k8sSECRETx93 timed out", "k8sSECRETx93"),
    ("https://api.telegram.org/bot123456:AAHsecretTOKEN/sendMessage", "AAHsecretTOKEN"),
    ("GET https://acct.blob.core.windows.net/c/f.csv?sv=2022&sig=SECRETsig%3D&se=1", "SECRETsig"),
    ("https://s3.example/x?X-Amz-Signature=abc123SECRET&X-Amz-Date=1", "abc123SECRET"),
    ("https://hook.example/in?signature=SECRETsig2", "SECRETsig2"),
    ("https://chat.googleapis.com/v1/spaces/S/messages?key=AIzaSECRET&token=tokSECRET",
     "AIzaSECRET"),
    ("X-Dx-Signature: sha256=deadbeefSECRET", "deadbeefSECRET"),
])
def test_redact(raw: str, leaked: str) -> None:
    out = redact(raw)
    assert leaked not in out and "***" in out


def test_redact_leaves_ordinary_text() -> None:
    text = ("scraped http://localhost:9400/metrics in 3 ms; user dx at db:5432; "
            "POST http://erp.local/services/orders?page=2 -> 200; key [42] failed")
    assert redact(text) == text
    assert redact("postgresql://dx:s3cr3t@db:5432/shop") == "postgresql://dx:***@db:5432/shop"


def test_json_logs_are_redacted_and_structured() -> None:
    stream = io.StringIO()  # not a terminal: auto picks JSON
    handler = setup_logging("INFO", "auto", stream=stream, static_fields={"role": "sink"})
    try:
        log = logging.getLogger("pipeline.test")
        log.info("cannot reach %s", "postgresql://dx:s3cr3t@db/shop", extra={"route": "pim"})
        try:
            raise RuntimeError("Authorization: Bearer tok-42")
        except RuntimeError:
            log.exception("delivery failed")
        log.debug("not shown")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert first["message"] == "cannot reach postgresql://dx:***@db/shop"
    assert first["level"] == "INFO" and first["logger"] == "pipeline.test"
    assert first["role"] == "sink" and first["route"] == "pim" and "time" in first
    assert "s3cr3t" not in stream.getvalue() and "tok-42" not in stream.getvalue()


def test_text_logs_when_asked_and_setup_is_idempotent() -> None:
    stream = io.StringIO()
    setup_logging("DEBUG", "json", stream=io.StringIO())
    handler = setup_logging("DEBUG", "text", stream=stream)
    try:
        root = logging.getLogger()
        assert sum(getattr(h, "_dx_handler", False) for h in root.handlers) == 1
        logging.getLogger("x").debug("password=abc")
    finally:
        logging.getLogger().removeHandler(handler)
    line = stream.getvalue()
    assert "DEBUG" in line and "password=***" in line and not line.startswith("{")


# -- tracing ------------------------------------------------------------------------------

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_traceparent_round_trip() -> None:
    consumed = [("dx.event_id", b"e1"), ("traceparent", TRACEPARENT.encode()),
                ("tracestate", b"vendor=x")]
    ctx = tracing.extract(consumed)
    out = tracing.inject([("dx.event_id", b"e1"), ("traceparent", b"stale")], ctx)
    as_dict = dict(out)
    assert as_dict["traceparent"] == TRACEPARENT.encode()
    assert as_dict["tracestate"] == b"vendor=x"
    assert [k for k, _ in out].count("traceparent") == 1
    assert tracing.trace_id(consumed) == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_no_context_no_trace_headers() -> None:
    assert tracing.inject([("a", b"1")]) == [("a", b"1")]
    assert tracing.inject(None) == []
    assert tracing.trace_id(None) is None
    assert tracing.trace_id({"traceparent": "garbage"}) is None


def test_attached_context_reaches_logs() -> None:
    stream = io.StringIO()
    handler = setup_logging("INFO", "json", stream=stream)
    try:
        with tracing.attached([("traceparent", TRACEPARENT.encode())]):
            logging.getLogger("pipeline.test").info("delivering")
            assert dict(tracing.inject())["traceparent"] == TRACEPARENT.encode()
    finally:
        logging.getLogger().removeHandler(handler)
    record = json.loads(stream.getvalue())
    assert record["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert record["span_id"] == "00f067aa0ba902b7"
