"""The one contract every sink connector implements.

A worker hands a connector batches of :class:`Record` (already filtered and mapped) and gets back
one :class:`Outcome` per record, in the same order. The worker owns everything around delivery:
retries with backoff, per-key order, dead letters, the task log. A connector only talks to its
target and classifies failures:

* raise or return :class:`~pipeline.errors.TransientError` when trying again later may work
  (timeouts, connection errors, 5xx); :class:`Backpressure` when the target asks to slow down
  (429 + ``Retry-After``) — it does not use up an attempt;
* :class:`~pipeline.errors.TerminalError` when the same input will always fail (a 400 validation
  error, a constraint violation): the task goes dead and its key is parked.

Most connectors subclass :class:`RecordConnector` and write one method, ``send(record)``. Bulk
targets subclass :class:`Connector` and implement ``deliver(batch)`` directly.

Delivery guarantee: at-least-once. A record may be sent again after a crash or a retry; every
record carries ``event_id``, which connectors pass to the target as an idempotency key.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import Field

from pipeline.config.connectors import ConnectorSettings
from pipeline.errors import DxError, TerminalError, TransientError
from pipeline.tasks.keys import key_text


class TableSettings(ConnectorSettings):
    """What every connector that writes rows into a database table is told (``postgres``,
    ``sql``): upsert each record's payload into ``table`` by ``key``; deletes delete by key."""

    table: str = Field(description="target table, optionally schema-qualified")
    key: list[str] | None = Field(None, description="key columns (upsert and delete match "
                                  "them); default the primary key")
    columns: list[str] | None = Field(
        None, description="columns written; default every payload field (each must exist)")
    on_delete: Literal["delete", "ignore"] = Field("delete", description="what a delete does")
    max_batch: int = Field(500, ge=1, le=10_000, description="records per transaction")
    connect_timeout_s: float = Field(5, gt=0)


class Backpressure(TransientError):
    """The target asks us to slow down (HTTP 429, a 503 with ``Retry-After``).

    Waiting does not count as a failed attempt: throttling must not dead-letter healthy events.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


@dataclass(frozen=True)
class Record:
    """One event on its way out. ``payload`` is the mapped JSON-ready object (``None`` only for
    a delete whose ``before`` image was not captured)."""

    event_id: str
    op: str
    key: dict[str, Any]
    payload: dict[str, Any] | None
    topic: str
    partition: int
    offset: int
    table: str = ""
    origin: str | None = None
    ts_ms: int | None = None
    #: the change's per-key monotonic position (text order = change order): a target that
    #: keeps the last position it applied per key drops a write with a lower one (a request
    #: that timed out and was applied late, after the next version of the key)
    position: str | None = None

    @property
    def is_delete(self) -> bool:
        return self.op == "d"


@dataclass
class Outcome:
    """What happened to one record. ``error`` is None on success. ``request``/``status``/
    ``response`` go to the task's export log (the worker truncates them)."""

    error: DxError | None = None
    request: str | None = None
    status: int | None = None
    response: str | None = None
    elapsed_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(cls, error: DxError, **kwargs: Any) -> Outcome:
        return cls(error=error, **kwargs)


#: An outcome for a record the connector did not try (an earlier record failed transiently);
#: the worker re-offers it without counting an attempt.
NOT_ATTEMPTED = TransientError("not attempted: an earlier record in the batch failed")

_CALL = threading.local()


@contextmanager
def call_scope(live: Callable[[], bool]) -> Iterator[None]:
    """The worker's side of :func:`still_live`: ``live`` says whether the records of the
    ``deliver`` call running in this thread may still be sent."""
    _CALL.live = live
    try:
        yield
    finally:
        _CALL.live = None


def still_live() -> bool:
    """For connectors that send one ``deliver`` call as several requests (bulk splits, record
    by record): False once the worker lets go of the call's partitions (a rebalance) — send
    nothing more and return ``NOT_ATTEMPTED`` for the rest, or the old owner's late requests
    overwrite what the partition's new owner delivered meanwhile."""
    live = getattr(_CALL, "live", None)
    return live is None or bool(live())


class LetGo(Exception):
    """Raised by :func:`ensure_live`: the worker let go of the call's partitions."""


def ensure_live() -> None:
    """:func:`still_live` for a point of no return (a request's first byte, a transaction's
    commit): raise :class:`LetGo` (undo, answer ``NOT_ATTEMPTED``) once the worker let go."""
    if not still_live():
        raise LetGo


S = TypeVar("S", bound=ConnectorSettings)


class Connector(abc.ABC, Generic[S]):
    """A target system. One instance per route per worker; ``deliver`` may be called from
    several worker lanes at once, so implementations must be thread-safe (share a client,
    not per-call state)."""

    #: the settings model validated from dx.yaml (``connector:`` block)
    settings_model: ClassVar[type[ConnectorSettings]]

    #: whether outcomes of successful deliveries carry ``request``/``response`` (the worker
    #: turns it off unless the route's task log keeps them): building them costs per record
    log_successes: bool = True

    def __init__(self, settings: S, *, route: str) -> None:
        self.settings = settings
        self.route = route

    def open(self) -> None:
        """Called once before the first delivery: connect, validate the target (e.g. that a
        table and its columns exist). Raise TerminalError for a misconfigured target (the worker
        stops with one clear line) or TransientError when it is unreachable."""

    def close(self) -> None:
        """Release clients and files; called once, also after a failure."""

    @property
    def max_batch(self) -> int:
        """Largest batch ``deliver`` accepts; the route's ``batch_size`` is capped by it."""
        return 1_000

    @property
    def sends_one_at_a_time(self) -> bool:
        """True when ``deliver`` sends record by record: the worker then calls it with one
        record at a time, checking partition ownership and the route's circuit breaker before
        each (a revoke waits for one request, not for a whole batch)."""
        return False

    @abc.abstractmethod
    def deliver(self, batch: Sequence[Record]) -> list[Outcome]:
        """Send ``batch`` and return one outcome per record, in order.

        Contract: a record must not be sent after an earlier record *of the same key* in the
        batch failed (return ``Outcome.failed(NOT_ATTEMPTED)`` for it) — the worker relies on
        this for per-key order. Raising instead of returning fails the whole batch with that
        error.
        """


class RecordConnector(Connector[S]):
    """Plumbing for targets that take one record per call: write ``send`` only.

    Records go one at a time, in order. After a transient failure the rest of the batch is not
    attempted (the target is probably down; the worker backs off). After a terminal failure the
    remaining records of *other* keys still go.
    """

    @property
    def sends_one_at_a_time(self) -> bool:
        return True

    @abc.abstractmethod
    def send(self, record: Record) -> Outcome:
        """Deliver one record; raise TransientError/TerminalError (or return a failed Outcome)."""

    def deliver(self, batch: Sequence[Record]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        failed_keys: set[str] = set()
        stop = False
        for record in batch:
            rkey = key_text(record.key)
            if stop or rkey in failed_keys or not still_live():
                outcomes.append(Outcome.failed(NOT_ATTEMPTED))
                continue
            started = time.perf_counter()
            try:
                outcome = self.send(record)
            except DxError as err:
                outcome = Outcome.failed(err)
            except Exception as err:  # a bug or an unwrapped driver error: do not lose the task
                outcome = Outcome.failed(TransientError(f"{type(err).__name__}: {err}"))
            if outcome.elapsed_ms is None:
                outcome.elapsed_ms = (time.perf_counter() - started) * 1000
            outcomes.append(outcome)
            if outcome.error is not None:
                failed_keys.add(rkey)
                if outcome.error.transient:
                    stop = True
        return outcomes


def one_by_one(batch: Sequence[Record], attempt: Callable[[Record], Outcome]) -> list[Outcome]:
    """Replay a batch record by record (after the whole batch failed on a data error, to find
    the culprit): a record after a failed record of its key is not attempted, nor any once
    the worker let go of the call's partitions (``attempt`` raises :class:`LetGo` for it)."""
    outcomes: list[Outcome] = []
    failed: set[str] = set()
    for r in batch:
        k = key_text(r.key)
        if k in failed or not still_live():
            outcomes.append(Outcome.failed(NOT_ATTEMPTED))
            continue
        try:
            outcome = attempt(r)
        except LetGo:
            outcome = Outcome.failed(NOT_ATTEMPTED)
        outcomes.append(outcome)
        if outcome.error is not None:
            failed.add(k)
    return outcomes


__all__ = [
    "NOT_ATTEMPTED",
    "Backpressure",
    "Connector",
    "ConnectorSettings",
    "LetGo",
    "Outcome",
    "Record",
    "RecordConnector",
    "TableSettings",
    "TerminalError",
    "TransientError",
    "call_scope",
    "ensure_live",
    "key_text",
    "still_live",
]
