"""The shapes inbound events take between decoding, validation, apply and task recording."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka import Message

from pipeline.tasks.store import TaskStatus

Op = Literal["upsert", "delete"]


@dataclass(slots=True, frozen=True)
class RawMessage:
    """What Kafka delivered, kept untouched for the task's import log and the dead letter."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    timestamp_ms: int | None = None


@dataclass(slots=True)
class Event:
    """A validated inbound change, ready to apply. ``row`` maps target columns to values."""

    message: RawMessage
    op: Op
    key: tuple[Any, ...]
    row: dict[str, Any] | None
    event_id: str | None = None


@dataclass(slots=True, frozen=True)
class Failure:
    """An event that was not applied, and why (never silent: it becomes a task).

    ``status`` is ``dead`` for events someone must look at (also dead-lettered), ``skipped`` for
    events the route's policy deliberately does not apply (an older version under
    last-writer-wins, a delete on a route without deletes).
    """

    message: RawMessage
    status: TaskStatus
    reason: str
    field: str | None = None
    key: tuple[Any, ...] | None = None
    event_id: str | None = None

    def describe(self) -> str:
        m = self.message
        where = f"{m.topic}[{m.partition}]@{m.offset}"
        field = f" field {self.field!r}:" if self.field else ""
        return f"{where}:{field} {self.reason}"


def _bytes(v: str | bytes | None) -> bytes | None:
    return v.encode() if isinstance(v, str) else v


def to_raw(msg: Message) -> RawMessage:
    """The consumed message as the worker keeps it (text keys and values as bytes)."""
    ts_type, ts = msg.timestamp()
    hdrs = msg.headers() or []
    items = hdrs.items() if isinstance(hdrs, dict) else hdrs
    return RawMessage(
        topic=str(msg.topic()), partition=partition_of(msg), offset=offset_of(msg),
        key=_bytes(msg.key()), value=_bytes(msg.value()),
        headers=tuple((k, _bytes(v)) for k, v in items), timestamp_ms=ts if ts_type != 0 else None,
    )


def partition_of(msg: Message) -> int:
    p = msg.partition()
    assert p is not None
    return p


def offset_of(msg: Message) -> int:
    o = msg.offset()
    assert o is not None
    return o
