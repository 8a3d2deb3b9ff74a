"""The task writer: batches task rows from all lanes of a sink worker into one transaction and
acknowledges each row once it is durable (the worker commits a Kafka offset only then)."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable

import psycopg

from pipeline.db import connect
from pipeline.errors import ServiceUnavailable, TerminalError
from pipeline.tasks.store import UPSERT, TaskRow

log = logging.getLogger(__name__)

Ack = Callable[[], None]


class TaskWriter:
    """Batches task rows from all lanes; acknowledges each row once its transaction commits.

    A failing database stalls the writer (it retries with backoff) rather than dropping rows:
    unacknowledged rows keep their offsets uncommitted, so nothing is lost if the worker dies.
    Any other failure (the database rejects the rows) stops the writer for good: ``fatal`` is
    set, ``flush`` raises :meth:`failure`, and the worker stops with that one line rather than
    running on with nothing recorded or committed.
    """

    def __init__(self, url: str, *, max_rows: int = 2000, max_wait_s: float = 0.05) -> None:
        self.url = url
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.queue: queue.Queue[tuple[TaskRow, Ack | None] | threading.Event] = queue.Queue()
        self.stopping = threading.Event()
        self.error: BaseException | None = None  # the last write failure (cleared on success)
        self.fatal: BaseException | None = None  # what stopped the writer thread, for good
        self.conn = connect(url, autocommit=False, application_name="dx-task-writer")
        self.thread = threading.Thread(target=self._run, name="task-writer", daemon=True)
        self.rows_written = 0

    def start(self) -> None:
        self.thread.start()

    def put(self, row: TaskRow, ack: Ack | None = None) -> None:
        self.queue.put((row, ack))

    def flush(self, timeout: float | None = 30) -> None:
        """Block until everything put so far is committed."""
        done = threading.Event()
        self.queue.put(done)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(0.1):
            if self.fatal is not None:
                raise self.failure()
            if deadline is not None and time.monotonic() > deadline:
                raise ServiceUnavailable("postgresql", "task store",
                                         "task writer did not flush")

    def failure(self) -> TerminalError:
        """The error that stopped the writer, as the one line the worker stops with."""
        err = self.fatal
        return TerminalError(f"task store rejected a write, stopping (nothing more is recorded "
                             f"or committed): {type(err).__name__}: {err}")

    def close(self) -> None:
        self.stopping.set()
        self.queue.put(threading.Event())
        self.thread.join(timeout=30)
        self.conn.close()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # the worker sees ``fatal`` and stops
            log.exception("task writer failed")
            self.fatal = err
            self.error = err

    def _loop(self) -> None:
        while True:
            batch: list[tuple[TaskRow, Ack | None]] = []
            events: list[threading.Event] = []
            item = self.queue.get()
            deadline = time.monotonic() + self.max_wait_s
            while True:
                if isinstance(item, threading.Event):
                    events.append(item)
                    if batch or events:
                        # a flush request: write now rather than wait for more rows
                        break
                else:
                    batch.append(item)
                    if len(batch) >= self.max_rows:
                        break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self.queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
            for e in events:
                e.set()
            if self.stopping.is_set() and self.queue.empty():
                return

    def _write(self, batch: list[tuple[TaskRow, Ack | None]]) -> None:
        delay = 0.2
        while True:
            try:
                with self.conn.cursor() as cur:
                    cur.executemany(UPSERT, [row.params() for row, _ in batch])
                self.conn.commit()
                break
            except psycopg.OperationalError as err:
                log.warning("task store write failed, retrying in %.1fs: %s", delay, err)
                self.error = err
                time.sleep(delay)
                delay = min(10.0, delay * 2)
                try:
                    self.conn.close()
                    self.conn = connect(self.url, autocommit=False,
                                        application_name="dx-task-writer")
                except ServiceUnavailable:
                    continue
            except Exception:
                with contextlib.suppress(Exception):
                    self.conn.rollback()
                raise
        self.error = None
        self.rows_written += len(batch)
        for _, ack in batch:
            if ack is not None:
                ack()
