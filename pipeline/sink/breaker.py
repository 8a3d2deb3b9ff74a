"""A route's circuit breaker: an outage pauses the route instead of killing its tasks.

Closed: attempts go. ``failures`` transient failures in a row open it (``since`` = the first of
them): lanes start no attempt, except one probe at a growing interval; a probe the target
answers closes it. While it is open, failures do not count as attempts, so no task goes dead
because the target is down. Thread-safe: lanes share one breaker.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from pipeline.config.sinks import BreakerPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BreakerState:
    open: bool
    since: float | None  # wall-clock time the target went down (None: up)
    error: str | None  # the last failure


class Breaker:
    def __init__(self, route: str, policy: BreakerPolicy, *,
                 max_attempts: int | None = None) -> None:
        """``max_attempts``: the route's retry budget. The breaker opens after
        ``min(policy.failures, max_attempts)`` failures in a row: a task's failures inside one
        run of failures then never reach its budget (with ``max_attempts: 3`` and the default
        ``failures: 5`` a lone event went dead while the target was down, the breaker shut)."""
        self.route = route
        self.policy = policy
        self.threshold = min(policy.failures, max_attempts or policy.failures)
        self.lock = threading.Lock()
        self.failures = 0
        self.first_failure: float | None = None  # wall clock
        self.is_open = False
        self.probing = False
        self.interval = policy.probe_initial_s
        self.next_probe = 0.0
        self.last_error: str | None = None
        self.version = 0  # bumped on every open/close, for whoever publishes the state
        self.answers = 0  # attempts the target answered (success or refusal), ever

    def permit(self) -> tuple[bool, bool]:
        """(may attempt now, as the probe). A probe permit must be followed by :meth:`record`
        of its outcome, or :meth:`release`."""
        if not self.is_open:
            return True, False
        with self.lock:
            if not self.is_open:
                return True, False
            if not self.probing and time.monotonic() >= self.next_probe:
                self.probing = True
                return True, True
            return False, False

    def closed(self) -> bool:
        return not self.is_open

    def wait_s(self) -> float:
        """How long until an attempt may go (0 when closed)."""
        if not self.is_open:
            return 0.0
        return max(0.05, self.next_probe - time.monotonic())

    def release(self) -> None:
        with self.lock:
            self.probing = False

    def record(self, *, answered: bool, error: str | None = None, probe: bool = False) -> bool:
        """Note one attempt's result (``answered``: the target answered, success or a terminal
        refusal). Returns whether a failure counts as an attempt of its task: not when the
        breaker is (or just went) open."""
        if answered and not self.is_open and not self.failures:
            self.answers += 1  # unlocked: a lost count only keeps a task alive longer
            return True
        now = time.monotonic()
        with self.lock:
            if answered:
                self.answers += 1
                self.failures = 0
                self.first_failure = None
                if probe:
                    self.probing = False
                if self.is_open:
                    self.is_open = False
                    self.interval = self.policy.probe_initial_s
                    self.version += 1
                    log.warning("route %s: target answers again; resuming", self.route)
                return True
            self.failures += 1
            self.last_error = error or self.last_error
            if self.first_failure is None:
                self.first_failure = time.time()
            if self.is_open:
                if probe:
                    self.probing = False
                    self.interval = min(self.policy.probe_max_s, self.interval * 2)
                    self.next_probe = now + self.interval
                return False
            if self.policy.enabled and self.failures >= self.threshold:
                self._trip(now)
                log.warning("route %s: target down (%d transient failures in a row, last: %s); "
                            "pausing, probing every %.0f-%.0fs", self.route, self.failures,
                            error, self.policy.probe_initial_s, self.policy.probe_max_s)
                return False
            return True

    def silent_since(self, mark: int, error: str) -> bool:
        """A task failed transiently for the last time its budget allows. True when nothing on
        the route was answered since ``mark`` (``answers`` at its first attempt here): the
        target looks down rather than refusing this event, so the breaker opens now and the
        task must not go dead. A redriven task comes with the attempts of earlier runs, and a
        task's failures can span several runs of failures: counting failures in a row alone
        let such a task go dead while the target was down. False when the breaker is off."""
        with self.lock:
            if not self.policy.enabled or self.answers != mark:
                return False
            if not self.is_open:
                self._trip(time.monotonic())
                self.last_error = error
                if self.first_failure is None:
                    self.first_failure = time.time()
                log.warning("route %s: target down (nothing answered while a task used its "
                            "last attempt: %s); pausing", self.route, error)
            return True

    def _trip(self, now: float) -> None:
        """Open (the lock is held): the first probe after ``probe_initial_s``."""
        self.is_open = True
        self.probing = False
        self.interval = self.policy.probe_initial_s
        self.next_probe = now + self.interval
        self.version += 1

    def state(self) -> BreakerState:
        with self.lock:
            return BreakerState(self.is_open, self.first_failure if self.is_open else None,
                                self.last_error if self.is_open else None)
