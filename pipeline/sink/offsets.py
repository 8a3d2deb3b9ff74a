"""Which offsets of each partition are finished, and how far the worker may commit."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from confluent_kafka import TopicPartition

TP = tuple[str, int]


class OffsetTracker:
    """Per partition: offsets consumed and not finished yet (their task is not durable).

    The committable offset of a partition is its oldest unfinished offset (or one past the
    highest consumed): a key waiting out a backoff holds the commit of its partition back, never
    the delivery of other keys. Thread-safe (the consumer thread adds, the task writer finishes).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[TP, set[int]] = {}
        self.high: dict[TP, int] = {}
        self.committed: dict[TP, int] = {}

    def add(self, topic: str, partition: int, offset: int) -> None:
        with self.lock:
            tp = (topic, partition)
            self.pending.setdefault(tp, set()).add(offset)
            self.high[tp] = max(self.high.get(tp, -1), offset)

    def done(self, topic: str, partition: int, offset: int) -> None:
        with self.lock:
            s = self.pending.get((topic, partition))
            if s is not None:
                s.discard(offset)

    def outstanding(self) -> int:
        with self.lock:
            return sum(len(s) for s in self.pending.values())

    def unfinished(self) -> dict[TP, int]:
        """Unfinished events per partition (what the lanes hold for it, in memory)."""
        with self.lock:
            return {tp: len(s) for tp, s in self.pending.items()}

    def committable(self) -> list[TopicPartition]:
        """Offsets to commit (next offset to read) where they moved since the last commit."""
        out: list[TopicPartition] = []
        with self.lock:
            for tp, high in self.high.items():
                s = self.pending.get(tp) or set()
                nxt = min(s) if s else high + 1
                if nxt > self.committed.get(tp, -1):
                    out.append(TopicPartition(tp[0], tp[1], nxt))
        return out

    def mark_committed(self, tps: Sequence[TopicPartition]) -> None:
        with self.lock:
            for tp in tps:
                self.committed[(tp.topic, tp.partition)] = tp.offset

    def unmark_committed(self, tps: Sequence[TopicPartition]) -> None:
        """An asynchronous commit failed: commit these again next time."""
        with self.lock:
            for tp in tps:
                if self.committed.get((tp.topic, tp.partition)) == tp.offset:
                    del self.committed[(tp.topic, tp.partition)]

    def committed_offset(self, topic: str, partition: int) -> int | None:
        """The offset this worker last committed for the partition (None: none yet)."""
        with self.lock:
            return self.committed.get((topic, partition))

    def forget(self, topic: str, partition: int) -> None:
        with self.lock:
            self.pending.pop((topic, partition), None)
            self.high.pop((topic, partition), None)
            self.committed.pop((topic, partition), None)
