"""Partition ownership across rebalances: generations, calls on the wire, the hand-over.

Each assigned partition has a generation, bumped on assign and on revoke; work carries the one
it entered under and is abandoned once that is not current any more (not delivered, not
recorded, offset not committed: the new owner redelivers it). A revoke first stops new attempts
on the partition, then waits (bounded) for calls already on the wire so their outcomes are
recorded and committed before the hand-over; only then is the generation bumped and the
partition stops being owned.

Work is admitted only under the generation of a partition owned right now (:meth:`admit`): a
message the client fetched before a revoke and handed over after it (one ``consume`` call
serves the rebalance callback between messages it already holds), or a pending task read for
a partition that was revoked meanwhile, used to take the *new* generation, looked current, and
was delivered by the partition's old owner after the hand-over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)

TP = tuple[str, int]


class Owned(Protocol):
    @property
    def tp(self) -> TP: ...

    generation: int


W = TypeVar("W", bound=Owned)


class Ownership:
    """Thread-safe: the consumer thread assigns and revokes, lanes check and register calls."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.generation: dict[TP, int] = {}
        self.partitions: set[TP] = set()
        self.revoking: set[TP] = set()
        self.inflight: dict[TP, int] = {}
        #: bumped on every assignment change: lanes re-check work they hold back
        self.epoch = 0

    def assign(self, tps: Iterable[TP]) -> None:
        with self.cond:
            for tp in tps:
                self.generation[tp] = self.generation.get(tp, 0) + 1
                self.partitions.add(tp)
            self.epoch += 1

    def hand_over(self, tps: set[TP], wait_s: float) -> None:
        """Stop new attempts on ``tps``, wait up to ``wait_s`` for calls on the wire, then end
        the generation: from here on nothing of it is delivered or recorded."""
        deadline = time.monotonic() + wait_s
        with self.cond:
            self.revoking |= tps
            while any(self.inflight.get(tp) for tp in tps):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("calls for revoked partitions still running after %.0fs; "
                                "letting go (their outcomes are not recorded)", wait_s)
                    break
                self.cond.wait(left)
            for tp in tps:
                self.generation[tp] = self.generation.get(tp, 0) + 1
            self.partitions -= tps
            self.revoking -= tps
            self.epoch += 1

    def admit(self, tp: TP) -> int | None:
        """The generation new work of ``tp`` enters under, or None when ``tp`` is not owned
        now (not assigned, or a revoke under way): such work is not taken at all (not
        tracked, not delivered, not recorded; the partition's owner reads it)."""
        with self.cond:
            if tp not in self.partitions or tp in self.revoking:
                return None
            return self.generation.get(tp, 0)

    def owned(self) -> list[TP]:
        """The partitions currently owned (a snapshot)."""
        with self.cond:
            return sorted(self.partitions)

    def current(self, w: Owned) -> bool:
        """Still owned under the generation the work entered with."""
        return w.tp in self.partitions and self.generation.get(w.tp) == w.generation

    def live(self, w: Owned) -> bool:
        """Current, and no revoke of its partition under way: a new attempt may start."""
        return self.current(w) and w.tp not in self.revoking

    def while_current(self, w: Owned, action: Callable[[], None]) -> bool:
        """Run ``action`` only if ``w`` is current, atomically with respect to a hand-over."""
        with self.cond:
            if not self.current(w):
                return False
            action()
            return True

    def begin(self, todo: list[W]) -> tuple[list[W], list[TP]]:
        """The work that may be attempted now, registered as on the wire (the rest is
        abandoned), and the partitions to pass to :meth:`end`."""
        with self.cond:
            keep = [w for w in todo if self.live(w)]
            tps = sorted({w.tp for w in keep})
            for tp in tps:
                self.inflight[tp] = self.inflight.get(tp, 0) + 1
        return keep, tps

    def end(self, tps: list[TP]) -> None:
        with self.cond:
            for tp in tps:
                n = self.inflight.get(tp, 0) - 1
                if n > 0:
                    self.inflight[tp] = n
                else:
                    self.inflight.pop(tp, None)
            self.cond.notify_all()
