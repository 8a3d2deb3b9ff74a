"""The oracle of the fault tier: what the database committed against what arrived."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from tests.integration.relay_support import TopicReader


@dataclass(frozen=True)
class Verdict:
    committed: int
    delivered: int
    lost: int
    dup: int

    def line(self, scenario: str) -> str:
        return (f"{scenario}: committed={self.committed} delivered={self.delivered} "
                f"lost={self.lost} dup={self.dup}")


def compare(scenario: str, committed: Iterable[Any], delivered: Iterable[Any]) -> Verdict:
    """Each committed change is a hashable fact (e.g. ``(key, value)``); each delivery too.
    Prints the verdict line and returns it; the test asserts what dx promises."""
    want = Counter(committed)
    got = Counter(delivered)
    lost = sum((want - got).values())
    dup = sum(n - 1 for n in got.values() if n > 1)
    verdict = Verdict(sum(want.values()), sum(got.values()), lost, dup)
    print(verdict.line(scenario), flush=True)
    return verdict


def topic_facts(stack: Any, topic: str, expect: int, *, timeout_s: float = 60.0,
                settle_s: float = 1.0) -> list[tuple[int, int]]:
    """``(id, v)`` of every create/update event on ``topic`` (tombstones and deletes left out),
    read with a real consumer until ``expect`` arrived or the timeout, then ``settle_s`` more."""
    reader = TopicReader(stack, topic)
    try:
        events = reader.read(until=expect, timeout_s=timeout_s, settle_s=settle_s)
    finally:
        reader.close()
    return [(e.key["id"], e.value["after"]["v"]) for e in events
            if e.key and e.value and e.value.get("after")]


def wait_drained(url: str, timeout_s: float = 90.0) -> None:
    """Until the outbox is empty (every committed change published and deleted)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with psycopg.connect(url, connect_timeout=5) as conn:
            row = conn.execute("SELECT count(*) FROM dx.outbox").fetchone()
        if row and row[0] == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"the outbox of {url.rsplit('/', 1)[-1]} was not drained")


def outbox_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM dx.outbox").fetchone()
    return int(row[0]) if row else 0


def relay_until_drained(cfg: Path, url: str, *args: str) -> str:
    """Run ``dx relay -c cfg ARGS`` as a process until the outbox of ``url`` is empty, stop it
    with SIGTERM, assert it exited 0; returns its output."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "relay", "-c", str(cfg),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_drained(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return out
