"""One event on its way through a sink lane, from Kafka or redriven from the task store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from confluent_kafka import Message

from connectors.base import Outcome, Record
from pipeline.errors import EventError
from pipeline.sink.mapping import Event

#: a key's identity in a sink worker: (topic, key text). Keys are qualified by topic: a route
#: reading two topics whose keys collide (product 1, order 1) keeps two keys, each with its own
#: order, parking and redrive (they used to wait behind each other's dead tasks)
KeyId = tuple[str, str]


@dataclass
class Work:
    """One message on its way through a lane (fresh from Kafka, or a redriven task).

    ``generation`` is the ownership generation of its partition when it entered this worker:
    once that is not current (a revoke), the work is abandoned: not delivered, not recorded."""

    topic: str
    partition: int
    offset: int
    raw_key: bytes | None
    raw_value: bytes
    headers: list[tuple[str, bytes | None]]
    key: dict[str, Any]
    key_text: str
    generation: int
    consumed_at: float
    attempts: int = 0
    redrive: bool = False
    # filled in by the lane
    event: Event | None = None
    record: Record | None = None
    problem: EventError | None = None  # undecodable or unmappable: goes dead at its turn
    skip: str | None = None  # filtered out: recorded skipped at its turn
    last: Outcome | None = None
    answers_mark: int = -1  # the route breaker's answer count at its first attempt here
    status: str | None = None

    @property
    def tp(self) -> tuple[str, int]:
        return self.topic, self.partition

    @property
    def ident(self) -> KeyId:
        return self.topic, self.key_text

    @property
    def prepared(self) -> bool:
        return self.record is not None or self.problem is not None or self.skip is not None

    def coords(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return None if v is None else v.decode("utf-8", "replace")
        return None


def message_headers(msg: Message) -> list[tuple[str, bytes | None]]:
    """A consumed message's headers, values as bytes (None stays None)."""
    out: list[tuple[str, bytes | None]] = []
    raw: Any = msg.headers() or []
    for k, v in raw:
        out.append((k, v.encode() if isinstance(v, str) else v))
    return out


def position(w: Work) -> str:
    """The event's per-key monotonic position, for targets that drop stale writes (compare as
    text: a later change of a key has a greater position). From the change's source position
    (``source.sequence``: the commit sequence and outbox id, or a WAL position), zero-padded;
    without one, from the Kafka offset (a key always lives in one partition of its topic)."""
    source = (w.event.value.get("source") if w.event is not None else None) or {}
    seq = str(source.get("sequence") or "")
    parts = seq.replace("/", ":").split(":") if seq else []
    try:
        if "/" in seq:  # a WAL position: hex high/low words
            return f"{(int(parts[0], 16) << 32) + int(parts[1], 16):020d}"
        if parts and all(p.isdigit() for p in parts):
            return "-".join(f"{int(p):020d}" for p in parts)
    except (ValueError, IndexError):
        pass
    return f"k{w.partition:05d}-{w.offset:020d}"
