"""Workers as an operator sees them: ``/metrics`` of a running ``dx sink run`` and ``dx relay``
(real processes, scraped over HTTP) with counters that move while events flow, and ``/readyz``
that is not ready before the worker has work: a sink before its partition assignment (its topic
does not exist yet), a relay while it is a hot standby."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.relay_support import captured_items, execute
from tests.integration.test_sink_support import (
    EventProducer,
    create_topic,
    target,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

GRACE_S = 20  # what the Kubernetes manifests give a pod between SIGTERM and SIGKILL


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dx_process(*args: str, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args, "--metrics-port", str(port),
         "--metrics-host", "127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def get(port: int, path: str) -> httpx.Response | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    except httpx.TransportError:
        return None  # not listening yet


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    resp = get(port, "/metrics")
    assert resp is not None and resp.status_code == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(v for (n, lbl), v in samples.items()
               if n == name and set(labels.items()) <= set(lbl))


def status_code(port: int, path: str) -> int | None:
    resp = get(port, path)
    return None if resp is None else resp.status_code


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM; the worker must exit cleanly within the grace period."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=GRACE_S)
    assert proc.returncode == 0, err
    return err


def test_sink_metrics_move_and_readyz_waits_for_the_assignment(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    topic = f"{topic_prefix}.public.products"
    port = free_port()
    with target() as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, f"""
  - name: obs
    topics: [{topic}]
    connector: {{type: http, url: "{srv.url}/items/{{$key.id}}"}}
""", client={"topic.metadata.refresh.interval.ms": 500})
        proc = dx_process("sink", "run", "obs", "-c", str(cfg), port=port)
        try:
            wait_for(lambda: status_code(port, "/healthz") == 200 or proc.poll() is not None,
                     30, what="the metrics server")
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            # the topic does not exist: the worker is up, in its group, with nothing assigned
            resp = wait_for(lambda: (lambda r: r if r is not None and r.json()["reason"] ==
                                     "waiting for a partition assignment" else None)(
                get(port, "/readyz")), 30, what="the worker to wait for its assignment")
            assert resp.status_code == 503 and resp.json()["status"] == "not ready"
            assert status_code(port, "/readyz?standby=ok") == 503  # not a standby either

            create_topic(stack, topic)
            wait_for(lambda: status_code(port, "/readyz") == 200, 60,
                     what="readiness after the assignment")
            assert get(port, "/readyz").json()["reason"] == "1 partition(s) assigned"  # type: ignore[union-attr]

            prod = EventProducer(stack, topic, topic_prefix)
            for i in range(10):
                prod.send(i)
            prod.flush()
            lbl = {"role": "sink", "route": "obs"}
            first = wait_for(lambda: (lambda s: s if value(
                s, "dx_events_delivered_total", **lbl) >= 10 else None)(scrape(port)),
                60, what="10 deliveries in /metrics")
            for i in range(10, 25):
                prod.send(i)
            prod.flush()
            second = wait_for(lambda: (lambda s: s if value(
                s, "dx_events_delivered_total", **lbl) >= 25 else None)(scrape(port)),
                60, what="25 deliveries in /metrics")
            for name in ("dx_events_received_total", "dx_events_delivered_total",
                         "dx_batch_size_count", "dx_batch_duration_seconds_count",
                         "dx_target_call_duration_seconds_count",
                         "dx_event_latency_seconds_count"):
                assert value(second, name, **lbl) > value(first, name, **lbl), name
            lag_key = ("dx_consumer_lag_messages",
                       frozenset({**lbl, "topic": topic, "partition": "0"}.items()))
            wait_for(lambda: scrape(port).get(lag_key) == 0, 30,
                     what="the lag gauge to show the partition caught up")
            assert len({r.headers["idempotency-key"] for r in srv.received()}) == 25
        finally:
            if proc.poll() is None:
                stop(proc)


def test_relay_metrics_move_and_a_standby_is_not_ready(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    cfg = captured_items(stack, pg_db, topic_prefix, tmp_path)
    port_a, port_b = free_port(), free_port()
    active = dx_process("relay", "-c", str(cfg), port=port_a)
    standby: subprocess.Popen[str] | None = None
    lbl = {"relay": topic_prefix}
    rlbl = {"role": "relay", "route": topic_prefix}
    try:
        wait_for(lambda: status_code(port_a, "/readyz") == 200 or active.poll() is not None,
                 60, what="the relay to be active")
        assert active.poll() is None, active.stderr.read() if active.stderr else ""
        execute(pg_db, "INSERT INTO items (id) SELECT g FROM generate_series(1, 10) g")
        first = wait_for(lambda: (lambda s: s if value(
            s, "dx_events_delivered_total", **rlbl) >= 10 else None)(scrape(port_a)),
            60, what="10 records in /metrics")
        for i in range(11, 16):  # five transactions: five more batches
            execute(pg_db, f"INSERT INTO items (id) VALUES ({i})")
        second = wait_for(lambda: (lambda s: s if value(
            s, "dx_events_delivered_total", **rlbl) >= 15 else None)(scrape(port_a)),
            60, what="15 records in /metrics")
        for name in ("dx_events_received_total", "dx_events_delivered_total",
                     "dx_batch_size_count", "dx_event_latency_seconds_count"):
            assert value(second, name, **rlbl) > value(first, name, **rlbl), name
        assert value(second, "dx_relay_active", **lbl) == 1
        assert ("dx_relay_backlog_events", frozenset(lbl.items())) in second

        standby = dx_process("relay", "-c", str(cfg), port=port_b)
        wait_for(lambda: (lambda r: r is not None and r.json()["status"] == "standby")(
            get(port_b, "/readyz")), 60, what="the second relay to declare itself standby")
        assert status_code(port_b, "/readyz") == 503
        assert status_code(port_b, "/readyz?standby=ok") == 200
        assert value(scrape(port_b), "dx_relay_active", **lbl) == 0

        stop(active)
        wait_for(lambda: status_code(port_b, "/readyz") == 200, 60,
                 what="the standby to take over")
        assert value(scrape(port_b), "dx_relay_active", **lbl) == 1
    finally:
        for proc in (active, standby):
            if proc is not None and proc.poll() is None:
                stop(proc)
