"""Messages a sink worker took from Kafka but could not hand to a lane: the schema registry did
not answer when their key was decoded (the key decides the lane, so it is decoded before any
lane sees the event).

Nothing about such a message is wrong, so it must not be dead-lettered, and the worker must not
stop either (a registry outage is not the route's fault). The worker keeps the messages here in
the order Kafka gave them, pauses its assignment and tries the first again after a growing
delay (1 s doubling to 10 s). Its loop goes on meanwhile: heartbeat, offset commits of finished
work, rebalances. One warning line says what waits and why when the wait begins, one when it
ends; a message of a partition revoked meanwhile is dropped (it was never tracked, so its
offset was never committed: the partition's new owner reads it).
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import Message

from pipeline.errors import ServiceUnavailable

log = logging.getLogger(__name__)

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 10.0


class KeyHold:
    """The held messages of one sink worker (used by its consumer thread only)."""

    def __init__(self, route: str) -> None:
        self.route = route
        self.messages: list[Message] = []
        self.waiting_since: float | None = None  # monotonic start of the current outage
        self._delay = FIRST_DELAY_S
        self._retry_at = 0.0

    def __bool__(self) -> bool:
        """Whether a registry wait is under way (messages held or being retried)."""
        return self.waiting_since is not None

    def failed(self, err: ServiceUnavailable, where: str) -> None:
        """Decoding the key of the message at ``where`` needed the registry, which failed."""
        now = time.monotonic()
        if self.waiting_since is None:
            self.waiting_since = now
            self._delay = FIRST_DELAY_S
            log.warning("route %s: cannot decode the key of %s (%s); consumption paused, "
                        "retrying until the schema registry answers", self.route, where, err)
        else:
            self._delay = min(MAX_DELAY_S, self._delay * 2)
            log.debug("route %s: key of %s still undecodable: %s", self.route, where, err)
        self._retry_at = now + self._delay

    def hold(self, messages: list[Message]) -> None:
        """Keep ``messages`` (the first is the one whose key failed), ahead of anything held."""
        self.messages = [*messages, *self.messages]

    def extend(self, messages: list[Message]) -> None:
        """Messages Kafka delivered while holding (a partition resumed by someone else)."""
        self.messages.extend(messages)

    def due(self) -> list[Message]:
        """The held messages once their retry is due (they leave the hold), else none."""
        if not self.messages or time.monotonic() < self._retry_at:
            return []
        out, self.messages = self.messages, []
        return out

    def cleared(self) -> bool:
        """Everything held went through: end the wait (True if one was under way)."""
        if self.waiting_since is None or self.messages:
            return False
        log.warning("route %s: schema registry answers again; consumption resumed after %.1fs",
                    self.route, time.monotonic() - self.waiting_since)
        self.waiting_since = None
        return True

    def drop(self, partitions: set[tuple[str, int]]) -> None:
        """Forget the messages of revoked partitions (their new owner reads them)."""
        self.messages = [m for m in self.messages
                         if (m.topic(), m.partition()) not in partitions]
