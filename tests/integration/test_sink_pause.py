"""An operator's pause reaches a running sink worker: events wait while the route is paused
(nothing delivered, nothing skipped) and flow, in order, from where they stopped on resume."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_sink_support import (
    EventProducer,
    create_topic,
    dx,
    sink_thread,
    target,
    tasks,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration


def test_paused_sink_route_holds_events_and_resumes_in_order(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)
    with target() as srv:
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, f"""
  - name: to-pim
    topics: [{topic}]
    connector:
      type: http
      url: {srv.url}/products/{{$key.id}}
      method: PUT
""")
        prod = EventProducer(stack, topic, topic_prefix)
        with sink_thread(cfg, "to-pim"):
            prod.send(1, seq=1)
            prod.flush()
            wait_for(lambda: len(srv.received()) == 1, 60, what="the first delivery")

            paused = dx(cfg, "sink", "pause", "to-pim")
            assert paused.returncode == 0, paused.stderr
            time.sleep(2.5)  # the worker re-reads the pause at most once a second
            for seq in range(2, 6):
                prod.send(1, seq=seq)
            prod.flush()
            time.sleep(3)
            assert len(srv.received()) == 1, "a paused route delivered"
            assert not [t for t in tasks(pg_db, "to-pim") if t["status"] == "skipped"]

            resumed = dx(cfg, "sink", "resume", "to-pim")
            assert resumed.returncode == 0, resumed.stderr
            wait_for(lambda: len(srv.received()) == 5, 60, what="delivery after resume")
            assert [r.json["seq"] for r in srv.received() if r.json] == [1, 2, 3, 4, 5]
