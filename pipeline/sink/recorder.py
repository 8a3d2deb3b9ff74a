"""Turns a lane's verdict on one event into its task row, and finishes its offset once durable."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from connectors.base import Outcome
from pipeline.config.sinks import SinkRoute
from pipeline.observability.metrics import WorkerMetrics
from pipeline.sink.mapping import jsonable
from pipeline.sink.offsets import OffsetTracker
from pipeline.sink.ownership import Ownership
from pipeline.sink.work import Work
from pipeline.tasks.headers import encode_headers
from pipeline.tasks.store import KEEPS_RAW, TaskRow
from pipeline.tasks.writer import TaskWriter

#: verdicts after which Kafka must redeliver the event (its offset stays unfinished)
UNDECIDED = ("retrying", "failed")


def _trunc(value: Any, limit: int) -> Any:
    """A log entry no longer than ``limit`` bytes of JSON (text with a marker when cut)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text.encode()) <= limit:
        return value
    cut = text.encode()[:limit].decode("utf-8", "ignore")
    return f"{cut}…[truncated, {len(text.encode())} bytes]"


@dataclass
class SinkStats:
    counts: dict[str, int] = field(default_factory=dict)


class Recorder:
    """Queues task rows on the writer; an event's offset is finished when its row is durable.

    Nothing is written for work whose partition was revoked since it entered: the new owner
    records that event (writing here could overwrite its outcome)."""

    def __init__(self, route: SinkRoute, writer: TaskWriter, tracker: OffsetTracker,
                 ownership: Ownership, metrics: WorkerMetrics) -> None:
        self.route = route
        self.writer = writer
        self.tracker = tracker
        self.ownership = ownership
        self.metrics = metrics
        self.stats = SinkStats()
        self._lock = threading.Lock()

    def record(self, w: Work, status: str, *, error: str | None = None,
               outcome: Outcome | None = None, dlq: dict[str, Any] | None = None) -> None:
        row = self.row(w, status, error=error, outcome=outcome, dlq=dlq)
        ack: Callable[[], None] | None = None
        if status not in UNDECIDED and not w.redrive:
            tracker, t, p, o = self.tracker, w.topic, w.partition, w.offset

            def ack() -> None:
                tracker.done(t, p, o)

        if not self.ownership.while_current(w, lambda: self.writer.put(row, ack)):
            return
        w.status = status
        with self._lock:
            self.stats.counts[status] = self.stats.counts.get(status, 0) + 1
        if status == "succeeded":
            self.metrics.delivered(w.topic)
        elif status == "dead":
            self.metrics.dead_lettered()

    def finish_unrecorded(self, w: Work) -> None:
        """An event decided without a task row (filtered, and skipped tasks are not kept)."""
        if not w.redrive:
            self.tracker.done(w.topic, w.partition, w.offset)

    def row(self, w: Work, status: str, *, error: str | None = None,
            outcome: Outcome | None = None, dlq: dict[str, Any] | None = None) -> TaskRow:
        detail = self.route.log.detail
        limit = self.route.log.max_bytes
        full = detail == "full" or (detail == "errors" and status not in ("succeeded", "skipped"))
        import_log = export_log = None
        if full:
            if w.event is not None:
                ev = w.event
                import_log = {
                    "received": _trunc(jsonable({"op": ev.op, "key": ev.key, "before": ev.before,
                                                 "after": ev.after, "origin": ev.origin}), limit),
                    "mapped": _trunc(w.record.payload if w.record else None, limit)}
            if outcome is not None and (outcome.request or outcome.status is not None):
                export_log = {"request": _trunc(outcome.request, limit), "status": outcome.status,
                              "response": _trunc(outcome.response, limit),
                              "elapsed_ms": None if outcome.elapsed_ms is None
                              else round(outcome.elapsed_ms, 2)}
        keep_raw = status in KEEPS_RAW
        return TaskRow(
            route=self.route.name, topic=w.topic, partition=w.partition, offset=w.offset,
            status=status, key=w.key_text,
            event_id=w.event.event_id if w.event is not None else w.header("dx.event_id"),
            op=w.event.op if w.event is not None else None, attempts=w.attempts,
            error=error, import_log=import_log, export_log=export_log,
            raw_key=w.raw_key if keep_raw else None, raw_value=w.raw_value if keep_raw else None,
            raw_headers=encode_headers(w.headers) if keep_raw else None,
            dlq=dlq, redrive=w.redrive and status in ("pending", "retrying", "failed"))
