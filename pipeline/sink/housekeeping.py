"""A sink worker's periodic task-store work, off the consumer thread (so it never delays a
consumed event): redrive polls, retention purge, and the breaker's state in ``dx.route_health``.

Every statement goes through one :class:`~pipeline.tasks.store.TaskStore` that reconnects after
a PostgreSQL restart (``dx tasks retry``/``skip`` keep working without a worker restart).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psycopg

from pipeline.config.sinks import SinkRoute
from pipeline.errors import DxError
from pipeline.sink.breaker import Breaker
from pipeline.sink.work import KeyId
from pipeline.tasks import health
from pipeline.tasks.store import TaskStore

log = logging.getLogger(__name__)

TP = tuple[str, int]


class Housekeeper(threading.Thread):
    def __init__(self, route: SinkRoute, db_url: str, breaker: Breaker, stop: threading.Event,
                 *, owned: Callable[[], list[TP]], parked: Callable[[], list[KeyId]],
                 redrive: Callable[[KeyId], None], redrive_poll_s: float,
                 purge_interval_s: float) -> None:
        super().__init__(name=f"housekeeping-{route.name}", daemon=True)
        self.route = route
        self.db_url = db_url
        self.breaker = breaker
        self.stop = stop
        self.owned = owned
        self.parked = parked
        self.redrive = redrive
        self.redrive_poll_s = redrive_poll_s
        self.purge_interval_s = purge_interval_s
        self._published = -1
        self.store: TaskStore | None = None

    def run(self) -> None:
        next_redrive = next_health = time.monotonic()
        next_purge = time.monotonic() + 5
        while not self.stop.wait(min(0.1, self.redrive_poll_s)):
            now = time.monotonic()
            if now >= next_redrive:
                self._with_store(self._poll_redrives)
                next_redrive = now + self.redrive_poll_s
            if now >= next_purge:
                self._with_store(self._purge)
                next_purge = now + self.purge_interval_s
            if now >= next_health or self.breaker.version != self._published:
                self._with_store(self._publish_health)
                next_health = now + 30
        if self.store is not None:
            self.store.close()

    def _with_store(self, action: Callable[[TaskStore], None]) -> None:
        try:
            if self.store is None:
                self.store = TaskStore.open(self.db_url, "dx-sink")
            action(self.store)
        except (DxError, psycopg.Error) as err:
            log.warning("route %s: task store: %s", self.route.name, err)
            try:
                if self.store is not None:
                    self.store.reconnect()
            except DxError as again:
                log.warning("route %s: task store still unavailable: %s", self.route.name,
                            again)

    def _poll_redrives(self, store: TaskStore) -> None:
        """Hand keys whose dead task was retried or skipped to their lane."""
        keys = set(store.redrive_candidates(self.route.name, self.owned()))
        keys.update(store.unblocked(self.route.name, self.parked()))
        for k in keys:
            self.redrive(k)

    def _purge(self, store: TaskStore) -> None:
        """Retention: drop this route's succeeded/skipped tasks older than log.retention_days."""
        n = store.purge(older_than_days=self.route.log.retention_days, route=self.route.name)
        if n:
            log.info("route %s: purged %d old tasks", self.route.name, n)

    def _publish_health(self, store: TaskStore) -> None:
        version = self.breaker.version
        state = self.breaker.state()
        health.publish(store.conn, self.route.name, state.open, state.since, state.error)
        self._published = version
