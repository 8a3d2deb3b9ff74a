"""Task filters and the offset watermark: pure logic, no services."""

from __future__ import annotations

import datetime as dt

import pytest

from pipeline.sink.offsets import OffsetTracker
from pipeline.tasks.store import TaskFilter, parse_time


def test_ages_and_iso_times() -> None:
    now = dt.datetime.now(dt.UTC)
    assert abs((now - parse_time("2h")) - dt.timedelta(hours=2)) < dt.timedelta(seconds=5)
    assert abs((now - parse_time("30 minutes")) - dt.timedelta(minutes=30)) < dt.timedelta(
        seconds=5)
    assert parse_time("2024-05-01T10:00:00") == dt.datetime(2024, 5, 1, 10, tzinfo=dt.UTC)
    with pytest.raises(ValueError):
        parse_time("yesterday-ish")


def test_filter_builds_parameters_in_clause_order() -> None:
    _, params = TaskFilter(status=["dead"], route="r", key='{"id":1}', since="1h").where()
    assert params[:2] == ["dead", "r"] and isinstance(params[4], dt.datetime)
    assert params[2] == ['[1]', '{"id":1}'] and params[3] == "[1]"  # either form of the key
    assert TaskFilter().where()[1] == []


def test_offsets_commit_only_up_to_the_first_unrecorded_one() -> None:
    t = OffsetTracker()
    for o in range(5):
        t.add("t", 0, o)
    t.done("t", 0, 0)
    t.done("t", 0, 2)  # 1 is still in flight: only offset 0 is safe
    assert [(p.partition, p.offset) for p in t.committable()] == [(0, 1)]
    t.mark_committed(t.committable())
    assert t.committable() == []
    for o in (1, 3, 4):
        t.done("t", 0, o)
    assert [p.offset for p in t.committable()] == [5]
