"""The relay lease under a frozen or cut-off active relay: a hot standby takes over within
about ``relay.lease_timeout_s`` (a frozen process keeps its TCP connection alive, so
PostgreSQL alone would keep its lock for hours), and nothing is lost or duplicated
(exactly-once). The takeover time is printed, not asserted."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.faults.oracle import compare, topic_facts, wait_drained
from tests.faults.proxy import Proxy
from tests.integration.relay_support import dx, execute, write_config
from tests.integration.test_relay_resilience import ITEMS, TABLES, Output, _writer

LEASE_TIMEOUT_S = 3


def lease_config(stack: Any, url: str, prefix: str, path: Path) -> Path:
    cfg = write_config(path, stack, url, prefix, TABLES)
    cfg.write_text(cfg.read_text().replace(
        "  standby_poll_s: 0.2\n",
        f"  standby_poll_s: 0.2\n  lease_timeout_s: {LEASE_TIMEOUT_S}\n"))
    return cfg


def via(url: str, proxy: Proxy) -> str:
    p = urlsplit(url)
    netloc = p.netloc.rsplit("@", 1)
    auth = netloc[0] + "@" if len(netloc) == 2 else ""
    return urlunsplit((p.scheme, f"{auth}{proxy.address}", p.path, p.query, p.fragment))


def relay(cfg: Path) -> tuple[subprocess.Popen[str], Output]:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "relay", "-c", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, Output(proc)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("fault", ["freeze", "blackhole", "cut"])
def test_standby_takes_over_from_a_frozen_or_cut_off_relay(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path, fault: str) -> None:
    execute(pg_db, ITEMS)
    direct = lease_config(stack, pg_db, topic_prefix, tmp_path / "dx.yaml")
    assert dx("capture", "install", "-c", str(direct)).returncode == 0
    proxy = Proxy(int(urlsplit(pg_db).port or 5432))
    proxied = lease_config(stack, via(pg_db, proxy), topic_prefix, tmp_path / "proxied.yaml")
    active, active_out = relay(proxied)
    active_out.wait_for(": active")
    standby, standby_out = relay(direct)
    committed: list[tuple[int, int]] = []
    stop_writing = threading.Event()
    writer = threading.Thread(target=_writer, args=(pg_db, stop_writing, committed))
    try:
        seen = standby_out.wait_for(": standby")
        writer.start()
        time.sleep(1.0)
        started = time.monotonic()
        if fault == "freeze":
            active.send_signal(signal.SIGSTOP)
        elif fault == "blackhole":
            proxy.blackhole()
        else:
            proxy.cut()
        standby_out.wait_for(": active", start=seen, timeout_s=120)
        print(f"{fault}: standby active {time.monotonic() - started:.1f}s after the fault "
              f"(lease_timeout_s={LEASE_TIMEOUT_S})", flush=True)
        time.sleep(1.0)
        if fault == "freeze":
            active.send_signal(signal.SIGCONT)
        proxy.heal()
        try:
            active.wait(90)  # the old holder finds out and stops
        except subprocess.TimeoutExpired:
            raise AssertionError("".join(active_out.lines)[-3000:]) from None
        stop_writing.set()
        writer.join()
        wait_drained(pg_db)
    finally:
        stop_writing.set()
        if writer.is_alive():
            writer.join()
        stop(active)
        stop(standby)
        proxy.close()
    assert active.returncode != 0 or "lost its lease" in "".join(active_out.lines)
    got = topic_facts(stack, f"{topic_prefix}.public.items", len(committed))
    verdict = compare(f"relay lease ({fault})", committed, got)
    assert verdict.lost == 0 and verdict.dup == 0
