"""What ``dx status`` reports about capture and relay: backlog, oldest pending change, relay
activity, and open transactions that hold captured changes back (pid, age, query)."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from pipeline.capture.ddl import LEASE_LOCK_CLASS


@dataclass
class OpenTransaction:
    pid: int
    age_s: float
    state: str
    application: str
    query: str
    holds_captured_changes: bool


@dataclass
class RelayStatus:
    backlog: int = 0
    oldest_pending_age_s: float | None = None
    committed_not_relayed: int = 0
    relay_active: str | None = None
    relay_standbys: int = 0
    last_delivery_age_s: float | None = None
    open_transactions: list[OpenTransaction] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def relay_status(conn: psycopg.Connection[Any], relay_name: str, *,
                 long_txn_s: float = 60.0, backlog_age_s: float = 300.0) -> RelayStatus:
    st = RelayStatus()
    if conn.execute("SELECT to_regclass('dx.outbox')").fetchone() == (None,):
        st.problems.append("dx is not initialised in this database (run 'dx init')")
        return st
    row = conn.execute(
        "SELECT count(*), extract(epoch FROM now() - min(created_at)) FROM dx.outbox"
    ).fetchone()
    assert row is not None
    st.backlog = int(row[0])
    st.oldest_pending_age_s = float(row[1]) if row[1] is not None else None
    row = conn.execute(
        "SELECT count(*) FROM dx.outbox o JOIN dx.txn t ON t.xid = o.xid").fetchone()
    st.committed_not_relayed = int(row[0]) if row else 0
    holders = conn.execute(
        "SELECT a.application_name, l.granted FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
        "AND l.classid = %s AND l.objid = hashtext(%s)::oid",
        (LEASE_LOCK_CLASS, relay_name)).fetchall()
    st.relay_active = next((str(h[0]) for h in holders if h[1]), None)
    st.relay_standbys = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s "
        "AND application_name NOT LIKE '%%:%%:%%:%%:%%'",
        (f"dx-relay:{relay_name}:%",)).fetchone()[0] - (1 if st.relay_active else 0)  # type: ignore[index]
    row = conn.execute("SELECT extract(epoch FROM now() - updated_at) FROM dx.relay_state "
                       "WHERE name = %s", (relay_name,)).fetchone()
    st.last_delivery_age_s = float(row[0]) if row else None
    for pid, age, state, app, query, captured in conn.execute(
        """
        SELECT a.pid, extract(epoch FROM now() - a.xact_start), a.state, a.application_name,
               left(a.query, 200),
               EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid
                       AND l.relation = 'dx.outbox'::regclass AND l.mode = 'RowExclusiveLock')
        FROM pg_stat_activity a
        WHERE a.xact_start IS NOT NULL AND a.pid <> pg_backend_pid()
          AND a.backend_type = 'client backend'
          AND now() - a.xact_start > make_interval(secs => %s)
        ORDER BY a.xact_start
        """, (long_txn_s,)):
        st.open_transactions.append(OpenTransaction(int(pid), float(age), str(state),
                                                    str(app), str(query), bool(captured)))
    conn.commit()
    for t in st.open_transactions:
        if t.holds_captured_changes:
            st.problems.append(
                f"transaction pid {t.pid} has held captured changes for {t.age_s:.0f}s "
                f"({t.state}): {t.query[:80]!r}")
    if st.oldest_pending_age_s is not None and st.oldest_pending_age_s > backlog_age_s \
            and st.committed_not_relayed:
        st.problems.append(f"outbox backlog is {st.oldest_pending_age_s:.0f}s old "
                           f"({st.committed_not_relayed} committed events not relayed)")
    if st.committed_not_relayed and st.relay_active is None:
        st.problems.append("no relay is active and committed events are waiting")
    return st


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return str(dt.timedelta(seconds=int(seconds)))
