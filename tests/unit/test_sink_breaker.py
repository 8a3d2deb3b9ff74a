"""The route's circuit breaker: opens after ``failures`` transient failures in a row, stops
counting attempts while open, lets one probe through at a growing interval, closes when the
target answers (a terminal refusal is an answer)."""

from __future__ import annotations

import time

from pipeline.config.sinks import BreakerPolicy
from pipeline.sink.breaker import Breaker


def breaker(**kw: float) -> Breaker:
    return Breaker("r", BreakerPolicy.model_validate({"failures": 3, "probe_initial_s": 0.05,
                                                      "probe_max_s": 0.2, **kw}))


def test_opens_after_failures_in_a_row_and_stops_counting_attempts() -> None:
    b = breaker()
    assert b.record(answered=False, error="503") and b.record(answered=False, error="503")
    assert b.record(answered=True)  # an answer resets the run
    assert b.record(answered=False) and b.record(answered=False)
    assert b.record(answered=False, error="refused") is False  # the third opens it: not counted
    assert not b.closed() and b.permit() == (False, False)
    assert b.record(answered=False) is False  # a call that was on the wire: not counted either
    st = b.state()
    assert st.open and st.since is not None and st.error == "refused"


def test_one_probe_at_a_time_at_a_growing_interval_then_resumes() -> None:
    b = breaker()
    for _ in range(3):
        b.record(answered=False)
    time.sleep(0.06)
    assert b.permit() == (True, True)
    assert b.permit() == (False, False)  # one probe at a time
    b.record(answered=False, probe=True)
    assert b.interval == 0.1 and b.permit() == (False, False)
    time.sleep(0.11)
    assert b.permit() == (True, True)
    b.record(answered=False, probe=True)
    assert b.interval == 0.2
    time.sleep(0.21)
    assert b.permit() == (True, True)
    version = b.version
    assert b.record(answered=True, probe=True)  # the target answers: closed again
    assert b.closed() and b.permit() == (True, False) and b.version == version + 1
    assert not b.state().open


def test_disabled_breaker_never_opens() -> None:
    b = Breaker("r", BreakerPolicy(enabled=False, failures=1))
    assert all(b.record(answered=False) for _ in range(10)) and b.closed()
