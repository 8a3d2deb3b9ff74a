"""Restore drill: the database the relay follows is replaced by a copy from an earlier point
(``CREATE DATABASE ... TEMPLATE`` taken as a backup, or ``pg_dump`` restored into a new
database), the application writes past Kafka's cursor before the relay restarts. The relay must
not resume from Kafka's cursor (that would delete new, never-published changes): it refuses with
one line, and ``dx relay --reset-state`` then publishes everything."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from tests.faults.oracle import (
    compare,
    outbox_count,
    relay_until_drained,
    topic_facts,
    wait_drained,
)
from tests.faults.own_postgres import OwnPostgres
from tests.integration.relay_support import captured_items, dx, execute, relay_thread, write_config

TABLES = "  - name: items\n    columns: [id, v]\n"


def _db_url(url: str, name: str) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, f"/{name}", p.query, p.fragment))


def _admin(url: str, statement: sql.Composable) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(_db_url(url, "postgres"), autocommit=True) as conn:
                conn.execute(statement)
            return
        except psycopg.errors.ObjectInUse:  # a relay connection still closing
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _write(url: str, ids: range) -> list[tuple[int, int]]:
    for i in ids:
        execute(url, f"INSERT INTO items (id, v) VALUES ({i}, {i * 10})")
    return [(i, i * 10) for i in ids]


def _publish(cfg: Path, url: str) -> None:
    with relay_thread(cfg):
        wait_drained(url)


def _backup(method: str, source: str, target: str) -> None:
    """Copy database ``source`` into a new database ``target`` (the "backup", restored)."""
    name = urlsplit(target).path.lstrip("/")
    if method == "template":
        _admin(source, sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(urlsplit(source).path.lstrip("/"))))
        return
    _admin(source, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dump = subprocess.run(["pg_dump", "--no-owner", source], capture_output=True, text=True,
                          check=True, timeout=120)
    subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", target], input=dump.stdout,
                   capture_output=True, text=True, check=True, timeout=120)


@pytest.mark.parametrize("method", ["template", "pg_dump"])
def test_restored_database_is_not_trusted(stack: Any, pg_db: str, topic_prefix: str,
                                          tmp_path: Path, method: str) -> None:
    cfg = captured_items(stack, pg_db, topic_prefix, tmp_path)
    committed = _write(pg_db, range(1, 4))
    _publish(cfg, pg_db)

    restored = _db_url(pg_db, f"{urlsplit(pg_db).path.lstrip('/')[:40]}_r{uuid.uuid4().hex[:6]}")
    _backup(method, pg_db, restored)  # the backup: 3 commits published, none pending
    try:
        committed += _write(pg_db, range(4, 14))  # published from the original after the backup
        _publish(cfg, pg_db)

        # the original is lost; the application goes on writing into the restored copy, past
        # Kafka's cursor (commit 13) before the relay is restarted against it
        committed += _write(restored, range(100, 115))
        cfg_r = write_config(tmp_path / "restored.yaml", stack, restored, topic_prefix, TABLES)
        res = dx("relay", "-c", str(cfg_r), timeout=120)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1, res.stdout + res.stderr
        assert "restored, copied or promoted" in lines[-1] and "--reset-state" in lines[-1], \
            res.stderr
        assert outbox_count(restored) == 15, "the refused start deleted nothing"

        relay_until_drained(cfg_r, restored, "--reset-state")

        got = topic_facts(stack, f"{topic_prefix}.public.items", len(committed))
        verdict = compare(f"restore drill ({method})", committed, got)
        assert verdict.lost == 0
        assert verdict.dup == 0  # the backup held no pending rows, so nothing repeats
    finally:
        _admin(pg_db, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(urlsplit(restored).path.lstrip("/"))))


# -- a dump restored into a new cluster -----------------------------------------------------------

def _xid(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()
    assert row is not None
    return int(row[0])


def _burn_xids(url: str, upto: int) -> None:
    """Commit empty transactions until the cluster's next transaction id is ``upto``."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DO $$ BEGIN WHILE pg_snapshot_xmax(pg_current_snapshot()) "  # type: ignore[arg-type]
                     f"< '{upto}'::xid8 LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; "
                     f"END $$")


def _pending_xids(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [int(r[0]) for r in conn.execute("SELECT xid::text FROM dx.txn ORDER BY seq")]


def test_dump_restored_into_a_new_cluster_keeps_transactions_apart(
        stack: Any, own_postgres: OwnPostgres, topic_prefix: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A plain dump of the shop (with changes not yet published) restored into a fresh cluster:
    that cluster hands out the restored changes' transaction ids again. Where the relay starts
    before the application writes, it moves the restored ids out of the way and publishes
    everything once; where new transactions already reused them, it refuses with one line."""
    old = own_postgres.database(f"dump_{uuid.uuid4().hex[:8]}")
    execute(old, "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
    cfg = write_config(tmp_path / "old.yaml", stack, old, topic_prefix, TABLES)
    assert dx("capture", "install", "-c", str(cfg)).returncode == 0
    _burn_xids(old, max(_xid(old), 4000))  # above what a fresh cluster uses for the restore
    published = _write(old, range(1, 4))
    _publish(cfg, old)  # the relay recorded this cluster's identity with its cursor
    pending = _write(old, range(4, 9))  # committed, not published: the relay is down
    restored_xids = _pending_xids(old)
    dump = subprocess.run(["pg_dump", "--no-owner", old], capture_output=True, text=True,
                          check=True, timeout=120).stdout

    new = OwnPostgres()
    try:
        moved, collided = new.database("moved"), new.database("collided")
        for db in (moved, collided):
            subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", db], input=dump,
                           capture_output=True, text=True, check=True, timeout=120)
        assert _xid(new.url) < restored_xids[0], "the new cluster is not behind the old one"
        # the same exchange (topics, relay) follows the restored database
        cfg_m = write_config(tmp_path / "moved.yaml", stack, moved, topic_prefix, TABLES)
        cfg_c = write_config(tmp_path / "collided.yaml", stack, collided, topic_prefix, TABLES)
        # "moved": the relay is started on the restored database before the application
        # writes; Kafka's cursor is another cluster's: refused until told to reset
        res = dx("relay", "-c", str(cfg_m), timeout=120)
        assert res.returncode == 1 and "belongs to database system" in res.stderr, res.stderr
        with relay_thread(cfg_m, reset_state=True):
            wait_drained(moved)
        assert any("came from another cluster" in r.getMessage() for r in caplog.records)

        # the application writes into both, one transaction each, with the ids the restored
        # changes had in the old cluster
        _burn_xids(new.url, restored_xids[0])
        committed = published + pending
        committed_c = list(pending)
        for i in range(100, 110):
            committed += _write(moved, range(i, i + 1))
            committed_c += _write(collided, range(i, i + 1))
        assert set(_pending_xids(collided)) & set(restored_xids), "no id was reused"

        with relay_thread(cfg_m):
            wait_drained(moved)
        got = topic_facts(stack, f"{topic_prefix}.public.items", len(committed))
        verdict = compare("dump restored into a new cluster, relay first", committed, got)
        assert (verdict.lost, verdict.dup) == (0, 0)

        # "collided": new transactions reused restored ids before any relay ran: refused
        res = dx("relay", "-c", str(cfg_c), "--reset-state", timeout=120)
        errors = [line for line in res.stderr.splitlines() if line.startswith("dx: error")]
        assert res.returncode == 1, res.stdout + res.stderr
        assert len(errors) == 1 and "cannot be told apart" in errors[0], res.stderr
        assert "runbook 'restored into a new cluster'" in errors[0]
        with psycopg.connect(collided) as conn:
            kept = [(r[0]["id"], r[0]["v"]) for r in conn.execute("SELECT after FROM dx.outbox")]
        verdict = compare("dump restored into a new cluster, ids reused: refused, kept in the "
                          "outbox", committed_c, kept)
        assert (verdict.lost, verdict.dup) == (0, 0)
    finally:
        new.close()
