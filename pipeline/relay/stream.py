"""Reading dx's logical replication slot: pgoutput over the streaming replication protocol.

PostgreSQL decodes a transaction when it commits and sends transactions in commit order, whole
(protocol version 1, no streaming of in-progress transactions): the stream's order is commit
order, and a long-open transaction delays nobody else's changes. Each captured change becomes
an :class:`~pipeline.relay.reader.OutboxRow` like trigger capture's, so one encoder serves both.

Positions: a row's cursor is (final LSN of its transaction, ordinal within it), the ordinal
counting only the rows dx emits, so a replay of the same WAL yields the same cursors and the
same ``event_id`` = uuid5(epoch, final LSN, ordinal) (see :mod:`pipeline.capture.logical` for
the epoch). The slot is confirmed only up to the last transaction whose rows are all delivered
(``confirm``), never further; after a restart the server resends everything after that, and
rows at or below the cursor Kafka already holds (``skip_upto``) are dropped.

What leaves the database: only the configured columns of configured tables (the allow-list is
applied here, hidden values are never even parsed); an update that changes no exposed column
emits nothing; a key change is a delete and a create, as in trigger capture.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import select
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

from pipeline.capture import logical
from pipeline.capture.catalog import typmod_parts
from pipeline.capture.install import spec_version
from pipeline.capture.spec import ColumnSpec, TableSpec
from pipeline.config import DxConfig
from pipeline.db import json_loads_exact, redact
from pipeline.errors import CatalogError, ServiceUnavailable, TerminalError, TransientError
from pipeline.relay import pgoutput
from pipeline.relay.encoder import EVENT_ID_NAMESPACE
from pipeline.relay.envelope import uuid5_text
from pipeline.relay.reader import Cursor, OutboxRow

log = logging.getLogger(__name__)

#: session settings of the replication connection: the text forms trigger capture sees
_OPTIONS = ("-c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=1 "
            "-c bytea_output=hex")
# A domain is described by its base type and the domain's type modifier (the relation message
# carries the column's, -1 for a domain), as pipeline/capture/catalog.py does for trigger capture.
_TYPES = """
SELECT t.oid, COALESCE(et.typname, bt.typname, t.typname), et.oid IS NOT NULL,
       COALESCE(et.typcategory, bt.typcategory, t.typcategory)::text,
       CASE WHEN bt.oid IS NULL THEN NULL ELSE t.typtypmod END
FROM pg_type t
LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
LEFT JOIN pg_type et ON t.typcategory = 'A' AND et.oid = t.typelem
WHERE t.oid = ANY(%s)
"""


class SlotLost(TerminalError):
    """dx's replication slot is missing or invalidated: changes may have been lost."""

    def __init__(self, slot: str, detail: str) -> None:
        super().__init__(
            f"replication slot {slot} {detail}: changes since the relay last confirmed may be "
            "lost; see the README runbook 'lost replication slot' (dx capture install, then "
            "dx snapshot every table, then dx relay --reset-state)")


@dataclass(frozen=True)
class Table:
    """How one relation's tuples become rows: exposed columns only, with their parsers."""

    entity: str
    version: int
    exposed: tuple[tuple[int, str, pgoutput.Parser], ...]  # (index in tuple, name, parser)
    key: tuple[str, ...]

    def row(self, values: list[Any], old: list[Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, name, parse in self.exposed:
            v = values[i]
            if v is None:
                out[name] = None
                continue
            if v is pgoutput.UNCHANGED:
                v = old[i] if old is not None else pgoutput.UNCHANGED
                if v is pgoutput.UNCHANGED:
                    raise TerminalError(
                        f"{self.entity}: column {name} is an unchanged large value the update "
                        "did not carry (REPLICA IDENTITY is not FULL); run 'dx capture install'")
                if v is None:
                    out[name] = None
                    continue
            out[name] = parse(v)
        return out

    def key_of(self, row: dict[str, Any]) -> dict[str, Any]:
        key = self.key
        if len(key) == 1:
            return {key[0]: row[key[0]]}
        return {k: row[k] for k in key}

    def unchanged(self, old: list[Any], new: list[Any], *, key_only: bool = False) -> bool:
        """Whether an update's exposed (or key) columns carry the same text before and after:
        the same text is the same value, so neither needs parsing to tell."""
        for i in self.key_indexes if key_only else self.indexes:
            v = new[i]
            if v is not pgoutput.UNCHANGED and v != old[i]:
                return False
        return True

    @functools.cached_property
    def indexes(self) -> tuple[int, ...]:
        return tuple(i for i, _, _ in self.exposed)

    @functools.cached_property
    def key_indexes(self) -> tuple[int, ...]:
        return tuple(i for i, name, _ in self.exposed if name in self.key)


class Resolver:
    """Relation message -> :class:`Table`, on a catalog connection of its own.

    The exposed columns are dx.yaml's; their types come from the relation message (the table
    as it was when the change was written). When they differ from the installed capture spec
    (a column type changed, a configured column was dropped), a new spec version is recorded,
    and the encoder registers its schema under the registry's compatibility rules, as trigger
    capture does after ``dx capture install``."""

    def __init__(self, conn: psycopg.Connection[Any], config: DxConfig) -> None:
        self.conn = conn
        self.tables = {(t.schema_name, t.table_name): t for t in config.tables}

    def table(self, rel: pgoutput.Relation) -> Table | None:
        """The exposed columns are those of the latest installed spec: a column added to
        dx.yaml takes effect with ``dx capture install`` (whose message in the stream makes
        the relay call this again), as in trigger mode."""
        tcfg = self.tables.get((rel.schema, rel.name))
        if tcfg is None:
            log.warning("relay: %s.%s is in publication %s but not in dx.yaml; its changes "
                        "are not published", rel.schema, rel.name, logical.PUBLICATION)
            return None
        row = self.conn.execute(
            "SELECT spec FROM dx.capture_spec WHERE entity = %s ORDER BY version DESC LIMIT 1",
            (tcfg.qualified,)).fetchone()
        if row is None:
            raise CatalogError(f"{tcfg.qualified}: no capture spec; run 'dx capture install'")
        installed = TableSpec.from_json(row[0])
        types = {int(r[0]): (r[1], bool(r[2]), r[3], r[4]) for r in self.conn.execute(
            _TYPES, ([c.type_oid for c in rel.columns],))}
        index = {c.name: i for i, c in enumerate(rel.columns)}
        cols: list[ColumnSpec] = []
        for name in (c.name for c in installed.columns):
            if name not in index:
                if name in installed.key:
                    raise CatalogError(f"{tcfg.qualified}: key column {name} was dropped")
                continue  # a dropped column leaves the schema (a compatible change)
            c = rel.columns[index[name]]
            typname, is_array, category, domain_typmod = types.get(
                c.type_oid, ("text", False, "S", None))
            precision, scale = typmod_parts(typname, c.typmod if domain_typmod is None
                                            else int(domain_typmod))
            try:
                nullable = installed.column(name).nullable
            except KeyError:
                nullable = True
            cols.append(ColumnSpec(name=name, type=typname, nullable=nullable,
                                   is_array=is_array, precision=precision, scale=scale,
                                   category=category))
        spec = TableSpec(entity=installed.entity, schema=installed.schema,
                         table=installed.table, topic=installed.topic, key=installed.key,
                         columns=tuple(cols))
        version = spec_version(self.conn, spec)
        self.conn.commit()
        exposed = tuple((index[c.name], c.name, pgoutput.text_parser(c.type, c.is_array))
                        for c in cols)
        return Table(spec.entity, version, exposed, spec.key)


class LogicalStream:
    """One replication connection reading the slot; rows out, confirmations in."""

    def __init__(self, url: str, slot: str, epoch: str, resolver: Resolver, *,
                 application_name: str, skip_upto: Cursor = Cursor()) -> None:
        self.url = url
        self.slot = slot
        self.epoch = epoch
        self.resolver = resolver
        self.application_name = application_name
        self.skip_upto = skip_upto
        self._conn: Any = None
        self._cur: Any = None
        self._tables: dict[int, Table | None] = {}
        self._relations: dict[int, pgoutput.Relation] = {}
        self._in_txn = False
        self._lsn = 0  # final LSN of the transaction being read
        self._xid = 0
        self._ts: Any = None
        self._ord = 0
        self._origin: str | None = None
        self._done: deque[tuple[int, int]] = deque()  # (final LSN, last ordinal) read whole
        self._emitted = (0, 0)  # (final LSN, ordinal) of the last row emitted
        self._skip = (skip_upto.seq, skip_upto.id)
        self._delivered = Cursor()
        self._confirmed = 0
        self._ids = self._event_ids()

    def _event_ids(self) -> Callable[[int, int], str]:
        ns = uuid.uuid5(EVENT_ID_NAMESPACE, f"slot:{self.epoch}").bytes
        return lambda lsn, n: uuid5_text(ns, f"{lsn}:{n}")

    # -- connection ---------------------------------------------------------------------------

    def open(self) -> None:
        """Connect and start streaming from the slot's confirmed position. A slot another
        process still holds (a killed relay's walsender not yet gone) is retried briefly."""
        deadline = time.monotonic() + 30
        while True:
            try:
                self._conn = psycopg2.connect(
                    self.url, connection_factory=psycopg2.extras.LogicalReplicationConnection,
                    application_name=self.application_name, options=_OPTIONS,
                    connect_timeout=10)
                self._cur = self._conn.cursor()
                self._cur.start_replication(
                    slot_name=self.slot, decode=False, status_interval=5,
                    options={"proto_version": "1", "messages": "true",
                             "publication_names": logical.PUBLICATION})
                return
            except psycopg2.errors.ObjectInUse as err:
                self.close()
                if time.monotonic() > deadline:
                    raise TransientError(f"replication slot {self.slot} is in use: "
                                         f"{_first_line(err)}") from None
                time.sleep(0.5)
            except psycopg2.Error as err:
                self.close()
                raise self._error(err) from None

    def _error(self, err: psycopg2.Error) -> Exception:
        text = _first_line(err)
        if isinstance(err, psycopg2.errors.UndefinedObject) and "slot" in text:
            return SlotLost(self.slot, "does not exist")
        if isinstance(err, psycopg2.errors.ObjectNotInPrerequisiteState) or \
                "invalidated" in text:
            return SlotLost(self.slot, f"cannot be read ({text})")
        if isinstance(err, psycopg2.OperationalError | psycopg2.InterfaceError):
            return ServiceUnavailable("postgresql", redact(self.url), f"replication: {text}")
        return TerminalError(f"replication slot {self.slot}: {text}")

    def close(self) -> None:
        conn, self._conn, self._cur = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(psycopg2.Error):
                conn.close()

    # -- reading ------------------------------------------------------------------------------

    def read(self, limit: int, *, linger_s: float, wait_s: float) -> list[OutboxRow]:
        """Up to ``limit`` rows: returns when the batch is full, ``linger_s`` after its first
        row when no more is waiting, or after ``wait_s`` with nothing at all."""
        rows: list[OutboxRow] = []
        cur = self._cur
        start = time.monotonic()
        first = 0.0
        try:
            while len(rows) < limit:
                msg = cur.read_message()
                if msg is None:
                    now = time.monotonic()
                    if rows:
                        if not first:
                            first = now
                        left = first + linger_s - now
                    else:
                        left = start + wait_s - now
                    if left <= 0:
                        break
                    select.select([cur], [], [], left)
                    continue
                self._handle(msg.payload, rows)
        except psycopg2.Error as err:
            raise self._error(err) from None
        return rows

    def _handle(self, buf: bytes, rows: list[OutboxRow]) -> None:
        kind = buf[0]
        if kind in (0x49, 0x55, 0x44):  # I U D
            self._change(buf, rows)
        elif kind == 0x42:  # B
            self._lsn, ts, self._xid = pgoutput.begin(buf)
            self._ts = pgoutput.commit_time(ts)
            self._ord = 0
            self._origin = None
            self._in_txn = True
        elif kind == 0x43:  # C
            self._done.append((self._lsn, self._ord))
            self._in_txn = False
        elif kind == 0x52:  # R
            rel = pgoutput.relation(buf)
            self._relations[rel.relid] = rel
            self._tables[rel.relid] = self.resolver.table(rel)
        elif kind == 0x4D:  # M
            self._message(buf, rows)
        elif kind == 0x54:  # T: got past dx's guard (disabled)
            for relid in pgoutput.truncate(buf):
                t = self._tables.get(relid)
                if t is not None:
                    log.error("relay: %s was truncated at %s (past dx's TRUNCATE guard: it "
                              "was disabled or dropped): consumers still hold "
                              "its rows; re-snapshot it ('dx snapshot %s') after deleting them "
                              "downstream", t.entity, pgoutput.lsn_text(self._lsn), t.entity)
        # Y (type) and O (origin) carry nothing for dx

    def _emit(self, rows: list[OutboxRow], entity: str, version: int, op: str, key: Any,
              before: Any, after: Any, origin: str | None, *,
              event_id: uuid.UUID | str | None = None, event_type: str | None = None) -> None:
        self._ord += 1
        lsn, n = self._lsn, self._ord
        if lsn < self._skip[0] or (lsn == self._skip[0] and n <= self._skip[1]):
            return
        rows.append(OutboxRow(
            lsn, n, self._xid, entity, version, op, key, before, after,
            origin, event_id or self._ids(lsn, n), event_type, self._ts))
        self._emitted = (lsn, n)

    def _change(self, buf: bytes, rows: list[OutboxRow]) -> None:
        relid, old_values, new_values = pgoutput.change(buf)
        t = self._tables.get(relid)
        if t is None:
            return
        if new_values is None:  # delete
            assert old_values is not None
            before = t.row(old_values)
            self._emit(rows, t.entity, t.version, "d", t.key_of(before), before, None,
                       self._origin)
            return
        if old_values is None:
            after = t.row(new_values)
            op = "c" if buf[0] == 0x49 else "u"
            self._emit(rows, t.entity, t.version, op, t.key_of(after), None, after,
                       self._origin)
            return
        if t.unchanged(old_values, new_values):
            return  # no exposed column changed (told from the text, nothing parsed)
        after = t.row(new_values, old_values)
        before = t.row(old_values)
        if before == after:
            return  # no exposed column changed
        key_new = t.key_of(after)
        key_old = key_new if t.unchanged(old_values, new_values, key_only=True) \
            else t.key_of(before)
        if key_old != key_new:
            self._emit(rows, t.entity, t.version, "d", key_old, before, None, self._origin)
            self._emit(rows, t.entity, t.version, "c", key_new, None, after, self._origin)
        else:
            self._emit(rows, t.entity, t.version, "u", key_new, before, after, self._origin)

    def _message(self, buf: bytes, rows: list[OutboxRow]) -> None:
        transactional, prefix, content = pgoutput.message(buf)
        if not transactional or not self._in_txn:
            return
        if prefix == logical.ORIGIN_PREFIX:
            self._origin = content.decode() or None
        elif prefix == logical.OUTBOX_PREFIX:
            data = json_loads_exact(content)
            self._emit(rows, data["aggregatetype"], 0, "e", data["aggregateid"], None,
                       data.get("payload"), data.get("origin") or self._origin,
                       event_id=uuid.UUID(data["event_id"]), event_type=data.get("type"))
        elif prefix == logical.SPEC_PREFIX:  # dx capture install committed a new spec
            entity = content.decode()
            for relid, rel in self._relations.items():
                if f"{rel.schema}.{rel.name}" == entity:
                    self._tables[relid] = self.resolver.table(rel)
        elif prefix == logical.SNAPSHOT_PREFIX:
            data = json_loads_exact(content)
            # snapshot rows are the database's state, nobody's change: no origin
            self._emit(rows, data["e"], int(data["v"]), "r", data["k"], None, data["a"], None)

    # -- confirming ---------------------------------------------------------------------------

    def confirm(self, delivered: Cursor) -> None:
        """Rows up to ``delivered`` are in Kafka: confirm every transaction read whole up to
        there (the server may then recycle its WAL and will not send it again)."""
        self._delivered = max(self._delivered, delivered)
        upto = 0
        while self._done and (self._done[0][0] < delivered.seq or (
                self._done[0][0] == delivered.seq and self._done[0][1] <= delivered.id)):
            upto = self._done.popleft()[0] + 1  # past the commit record: not resent
        self._send(upto)

    def idle(self) -> None:
        """Nothing waiting: when everything read is delivered and no transaction is half
        read, confirm up to where the server says it is (keepalives), so a quiet slot does not
        hold WAL that other databases write."""
        if self._in_txn or self._emitted > (self._delivered.seq, self._delivered.id):
            return
        upto = self._done[-1][0] + 1 if self._done else 0
        self._done.clear()
        wal_end = int(getattr(self._cur, "wal_end", 0) or 0)
        self._send(max(upto, wal_end))

    def keepalive(self) -> None:
        """A status update now (positions unchanged), for when nothing is read for a while:
        psycopg2 sends them only from ``read_message``, and a walsender that hears nothing
        for ``wal_sender_timeout`` ends the connection."""
        try:
            self._cur.send_feedback(force=True)
        except psycopg2.Error as err:
            raise self._error(err) from None

    def _send(self, lsn: int) -> None:
        if lsn <= self._confirmed:
            return
        try:
            self._cur.send_feedback(flush_lsn=lsn, reply=False)
        except psycopg2.Error as err:
            raise self._error(err) from None
        self._confirmed = lsn

    @property
    def confirmed(self) -> int:
        return self._confirmed


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
