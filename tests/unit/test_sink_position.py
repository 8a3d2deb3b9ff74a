"""The per-key position every delivery carries (stale-write protection): it grows with every
change of a key, compared as text, and the demo PIM drops a write whose position is not above the
last one it applied."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.sink.mapping import Event
from pipeline.sink.work import Work, position

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "demo"))
import pim


def work(offset: int, sequence: str | None) -> Work:
    w = Work(topic="t", partition=2, offset=offset, raw_key=None, raw_value=b"", headers=[],
             key={"id": 1}, key_text='{"id":1}', generation=1, consumed_at=0.0)
    w.event = Event("t", 2, offset, {"id": 1}, {"op": "u", "source": {"sequence": sequence}})
    return w


def test_positions_order_as_text_like_the_changes() -> None:
    seqs = ["9:1", "10:2", "10:11", "123456:7"]
    assert [position(work(i, s)) for i, s in enumerate(seqs)] == sorted(
        position(work(i, s)) for i, s in enumerate(seqs))
    assert position(work(0, "0/16B3748")) < position(work(1, "0/16B3750")) < \
        position(work(2, "1/0"))
    assert position(work(9, None)) < position(work(10, None))  # no source position: the offset


def test_the_demo_pim_drops_a_late_write_with_a_lower_position() -> None:
    p = pim.Pim(pim.Publisher(None, "t"), token=None, fail_rate=0, reject_marker=None)
    newer, older = position(work(1, "10:2")), position(work(0, "9:1"))
    assert p.deliver("PUT", "products", "1", {"id": 1, "name": "new"}, "b", newer)[1][
        "status"] == "stored"
    assert p.deliver("PUT", "products", "1", {"id": 1, "name": "old"}, "a", older)[1][
        "status"] == "stale"
    assert p.collections["products"]["1"]["name"] == "new"
