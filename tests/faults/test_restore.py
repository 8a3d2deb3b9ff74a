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
