"""``dx snapshot TABLE``: initial load / backfill as ``op=r`` events through the outbox.

Each chunk is one transaction that copies the next rows by key into the outbox. Because rows
are read ``FOR SHARE`` and the chunk is ordered with concurrent changes by commit (see
:mod:`pipeline.capture.ddl`), a snapshot row never overtakes a newer change of the same key.
Progress is stored in ``dx.snapshot_progress`` in the same transaction, so an interrupted
snapshot resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg

from pipeline.capture import ddl
from pipeline.capture.install import install_table, table_state
from pipeline.config import DxConfig
from pipeline.errors import CatalogError


def snapshot_table(conn: psycopg.Connection[Any], config: DxConfig, index: int, *,
                   chunk: int = 5000, restart: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> int:
    """Copy every row of ``config.tables[index]`` into the outbox; returns rows copied."""
    state = table_state(conn, config, index)
    if not state.installed:
        raise CatalogError(f"capture is not installed on {state.entity}; run "
                           "'dx capture install' first so changes during the snapshot are kept")
    spec, version, _ = install_table(conn, config, index)  # same spec version as the triggers
    total_row = conn.execute(
        "SELECT c.reltuples::bigint FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (spec.schema, spec.table)).fetchone()
    estimate = max(0, int(total_row[0])) if total_row else 0
    with conn.transaction():
        if restart:
            conn.execute("DELETE FROM dx.snapshot_progress WHERE entity = %s", (spec.entity,))
        row = conn.execute("SELECT last_key, rows, finished_at FROM dx.snapshot_progress "
                           "WHERE entity = %s", (spec.entity,)).fetchone()
        if row is None or row[2] is not None:
            conn.execute("INSERT INTO dx.snapshot_progress (entity) VALUES (%s) "
                         "ON CONFLICT (entity) DO UPDATE SET last_key = NULL, rows = 0, "
                         "started_at = now(), finished_at = NULL", (spec.entity,))
            last_key, done = None, 0
        else:
            last_key, done = row[0], int(row[1])
    first = ddl.snapshot_chunk(spec, version, chunk, after_key=False)
    nxt = ddl.snapshot_chunk(spec, version, chunk, after_key=True)
    while True:
        with conn.transaction():
            conn.execute("SELECT dx.mark_txn()")
            if last_key is None:
                res = conn.execute(first).fetchone()
            else:
                res = conn.execute(nxt, {"last": json.dumps(last_key)}).fetchone()
            n, key = (int(res[0]), res[1]) if res else (0, None)
            done += n
            if n:
                last_key = key
            conn.execute("UPDATE dx.snapshot_progress SET last_key = %s, rows = %s, "
                         "finished_at = CASE WHEN %s THEN now() END WHERE entity = %s",
                         (json.dumps(last_key), done, n < chunk, spec.entity))
        if progress:
            progress(done, max(estimate, done))
        if n < chunk:
            return done
