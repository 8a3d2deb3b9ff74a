"""Reading the replication slot ahead of delivery, on a thread of its own.

With one thread, the relay waited for the walsender between reads and the walsender waited for
the relay while a Kafka transaction committed (produce flush, ``commit_transaction``, the
state-topic write): each side idled while the other worked. The pump keeps reading and parsing
the stream into a bounded queue while the relay's thread encodes, produces and commits, so those
waits overlap (the Kafka client and the socket waits release the GIL). The queue holds at most
about a drain transaction's worth of rows, so memory stays bounded when Kafka is slower.

The pump owns the replication connection and the catalog connection (relation messages,
``dx.capture_slot``): nothing else touches them, so neither needs a lock. The relay hands it
the cursor Kafka committed (:meth:`StreamPump.confirm`); the pump confirms the slot up to there
on its next turn, never further (:meth:`LogicalStream.confirm`). An error on the pump's thread
(a lost slot, the database gone, a bug) ends the pump and is raised again, the same exception,
in the relay's thread by its next :meth:`StreamPump.take`: one line, never a silent stall.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from pipeline.relay.reader import Cursor, OutboxRow
from pipeline.relay.stream import LogicalStream

log = logging.getLogger(__name__)

#: rows the pump parses per read before handing them over (fewer when no more is waiting)
CHUNK_ROWS = 1000
#: while the relay is busy with a batch and the socket has run dry, the pump waits this long
#: before reading again, so it wakes (and takes the GIL from the relay's thread) once per few
#: hundred rows rather than once per network read; a relay waiting for rows ends the pause
PACE_S = 0.003
#: while the relay is not taking rows (a Kafka retry), how often the pump tells the walsender it
#: is alive (wal_sender_timeout would end the connection otherwise) and looks at confirmations
KEEPALIVE_S = 5.0
#: how often the confirmed position is recorded for ``dx status``
MARK_EVERY_S = 5.0


class _Chunk(NamedTuple):
    rows: list[OutboxRow]
    at: float  # time.monotonic() when they were read


class _Failed(NamedTuple):
    error: BaseException


class StreamPump:
    """A thread that reads :class:`LogicalStream` into a queue bounded in rows."""

    def __init__(self, stream: LogicalStream, *, max_rows: int, wait_s: float,
                 mark_confirmed: Callable[[int], None]) -> None:
        self.stream = stream
        self.wait_s = wait_s
        self.mark_confirmed = mark_confirmed
        self._max_rows = max(1, max_rows)
        self._chunk_rows = min(CHUNK_ROWS, self._max_rows)
        self._items: deque[_Chunk | _Failed] = deque()
        self._rows = 0  # rows in _items
        self._cond = threading.Condition()  # guards _items, _rows, _delivered
        self._held: _Chunk | None = None  # taken from the queue, not yet handed out
        self._delivered: Cursor | None = None  # latest cursor Kafka committed, to confirm
        self._wanted = threading.Event()  # the relay's thread is waiting for rows
        self._stop = threading.Event()
        self._last_mark = 0.0
        self._thread = threading.Thread(target=self._run, name="dx-relay-stream", daemon=True)

    # -- the relay's side -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def confirm(self, delivered: Cursor) -> None:
        """Rows up to ``delivered`` are committed in Kafka (called by the relay's thread)."""
        with self._cond:
            if self._delivered is None or delivered > self._delivered:
                self._delivered = delivered

    def take(self, limit: int, *, linger_s: float, wait_s: float) -> list[OutboxRow]:
        """Up to ``limit`` rows: as soon as ``limit`` are read, or once the first of them was
        read ``linger_s`` ago (rows read while the last batch was delivered leave at once),
        or nothing after ``wait_s``. Raises what stopped the pump."""
        rows: list[OutboxRow] = []
        first = self._next(wait_s)
        if first is None:
            return rows
        deadline = first.at + linger_s
        chunk: _Chunk | None = first
        while chunk is not None:
            room = limit - len(rows)
            if len(chunk.rows) > room:
                rows += chunk.rows[:room]
                self._held = _Chunk(chunk.rows[room:], chunk.at)
                break
            rows += chunk.rows
            if len(rows) >= limit:
                break
            chunk = self._next(deadline - time.monotonic())
        return rows

    def _next(self, timeout: float) -> _Chunk | None:
        if self._held is not None:
            chunk, self._held = self._held, None
            return chunk
        with self._cond:
            if not self._items and timeout > 0:
                self._wanted.set()
                self._cond.wait(timeout)
                self._wanted.clear()
            if not self._items:
                return None
            item = self._items.popleft()
            if isinstance(item, _Failed):
                raise item.error
            self._rows -= len(item.rows)
            self._cond.notify_all()
        return item

    def close(self) -> None:
        """Stop the thread (it notices within ``wait_s``) and wait for it; the caller closes
        the stream afterwards."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(max(10.0, 2 * self.wait_s))
            if self._thread.is_alive():
                log.warning("relay: the replication reader did not stop within %.0fs",
                            max(10.0, 2 * self.wait_s))

    # -- the pump's thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            stream = self.stream
            while not self._stop.is_set():
                self._confirm()
                rows = stream.read(self._chunk_rows, linger_s=0.0, wait_s=self.wait_s)
                if rows:
                    self._put(_Chunk(rows, time.monotonic()))
                    if len(rows) < self._chunk_rows and not self._wanted.is_set():
                        self._wanted.wait(PACE_S)
                else:
                    stream.idle()
        except BaseException as err:  # handed to the relay's thread and raised there
            with self._cond:
                self._items.append(_Failed(err))
                self._cond.notify_all()

    def _confirm(self) -> None:
        with self._cond:
            delivered = self._delivered
        if delivered is not None:
            self.stream.confirm(delivered)
        now = time.monotonic()
        if now - self._last_mark > MARK_EVERY_S and self.stream.confirmed:
            self._last_mark = now
            self.mark_confirmed(self.stream.confirmed)

    def _put(self, chunk: _Chunk) -> None:
        """Into the queue once it has room; while it has none (the relay busy or retrying)
        the confirmations still go out and the walsender hears from the pump."""
        quiet_since = time.monotonic()
        while not self._stop.is_set():
            with self._cond:
                if self._rows < self._max_rows:
                    self._items.append(chunk)
                    self._rows += len(chunk.rows)
                    self._cond.notify_all()
                    return
                self._cond.wait(0.1)
            if time.monotonic() - quiet_since >= KEEPALIVE_S:
                quiet_since = time.monotonic()
                self._confirm()
                self.stream.keepalive()
