"""``dx snapshot`` against the real PostgreSQL (no relay, no Kafka: the outbox is the result).

A key moved by a concurrent transaction must not make the snapshot skip rows; the snapshot
never touches the triggers and refuses to run on missing or drifted capture; resume points are
compared with the key columns' own types and collations, whatever schema the types live in."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline.capture.install import ensure_schema, install_table
from pipeline.capture.snapshot import snapshot_table
from pipeline.config import DxConfig
from pipeline.config.loader import load_config
from pipeline.errors import CatalogError
from tests.integration.relay_support import dx, execute, write_config


def capture(stack: Any, db: str, prefix: str, tmp_path: Path, tables: str) -> Path:
    """Write dx.yaml for ``tables`` and install capture (in-process; no registry needed)."""
    cfg = write_config(tmp_path / "dx.yaml", stack, db, prefix, tables)
    config = load_config(cfg)
    with psycopg.connect(db, autocommit=True) as conn:
        ensure_schema(conn, config)
        for i in range(len(config.tables)):
            install_table(conn, config, i)
    return cfg


def run_snapshot(db: str, config: DxConfig, **kw: Any) -> int:
    with psycopg.connect(db, autocommit=True) as conn:
        return snapshot_table(conn, config, 0, **kw)


def outbox(db: str, entity: str) -> list[tuple[str, dict[str, Any]]]:
    with psycopg.connect(db) as conn:
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT op, key FROM dx.outbox WHERE entity = %s ORDER BY id", (entity,))]


def trigger_oids(db: str, table: str) -> list[tuple[int, int]]:
    with psycopg.connect(db) as conn:
        return [(int(r[0]), int(r[1])) for r in conn.execute(
            "SELECT oid, xmin::text::bigint FROM pg_trigger WHERE tgrelid = %s::regclass "
            "ORDER BY tgname", (table,))]


def test_key_moved_during_a_chunk_skips_nothing(stack: Any, pg_db: str, topic_prefix: str,
                                                tmp_path: Path) -> None:
    execute(pg_db, "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)",
            "INSERT INTO t (id) SELECT g FROM generate_series(1, 20) g")
    cfg = capture(stack, pg_db, topic_prefix, tmp_path, "  - name: t\n    columns: [id, v]\n")
    config = load_config(cfg)
    holder = psycopg.connect(pg_db)
    holder.execute("SELECT 1 FROM t WHERE id = 7 FOR UPDATE")  # chunk 2 (6..10) waits on it
    holder_pid = holder.info.backend_pid
    result: dict[str, Any] = {}

    def snap() -> None:
        try:
            result["rows"] = run_snapshot(pg_db, config, chunk=5)
        except BaseException as err:  # surfaced below
            result["error"] = err

    thread = threading.Thread(target=snap, daemon=True)
    thread.start()
    try:
        with psycopg.connect(pg_db, autocommit=True) as watch:
            deadline = time.monotonic() + 20
            while not watch.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND "
                    "%s = ANY(pg_blocking_pids(pid)) AND query LIKE '%%FOR SHARE%%'",
                    (holder_pid,)).fetchone():
                assert time.monotonic() < deadline and thread.is_alive(), result
                time.sleep(0.02)
        holder.execute("UPDATE t SET id = 15000 WHERE id = 7")
        holder.commit()
    finally:
        holder.close()
    thread.join(30)
    assert not thread.is_alive() and "error" not in result, result
    events = outbox(pg_db, "public.t")
    snapped = [k["id"] for op, k in events if op == "r"]
    assert sorted(snapped) == [*[i for i in range(1, 21) if i != 7], 15000]
    assert len(snapped) == len(set(snapped)) == result["rows"] == 20
    changes = [(op, k["id"]) for op, k in events if op != "r"]
    assert changes == [("d", 7), ("c", 15000)]
    with psycopg.connect(pg_db) as conn:  # 15000's snapshot row commits after its insert
        order = [(r[0], r[1]) for r in conn.execute(
            "SELECT o.op, (o.key ->> 'id')::int FROM dx.outbox o JOIN dx.txn x ON x.xid = o.xid "
            "WHERE o.key ->> 'id' IN ('7', '15000') ORDER BY x.seq, o.id")]
    assert order == [("d", 7), ("c", 15000), ("r", 15000)]


def test_resume_by_typed_keys_enum_in_other_schema_and_collation(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    # The enum's order is not alphabetical and the name column sorts with ICU ('a' < 'B'),
    # not the database default; the schema is not on search_path.
    execute(pg_db, "CREATE SCHEMA snap_other",
            "CREATE TYPE snap_other.level AS ENUM ('zeta', 'alpha', 'mid')",
            'CREATE TABLE snap_other.readings (lvl snap_other.level, name text COLLATE '
            '"und-x-icu", n int, v int NOT NULL DEFAULT 0, PRIMARY KEY (lvl, name, n))',
            "INSERT INTO snap_other.readings (lvl, name, n) SELECT l, nm, g FROM "
            "unnest(enum_range(NULL::snap_other.level)) l, "
            "unnest(ARRAY['a', 'B', 'c', 'D', 'e']) nm, generate_series(1, 3) g")
    cfg = capture(stack, pg_db, topic_prefix, tmp_path,
                  "  - name: snap_other.readings\n    columns: [lvl, name, n, v]\n")
    config = load_config(cfg)

    def interrupt(done: int, total: int) -> None:
        if done >= 14:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # stops after chunks 1 and 2; resumes at chunk 3
        run_snapshot(pg_db, config, chunk=7, progress=interrupt)
    assert run_snapshot(pg_db, config, chunk=7) == 45
    with psycopg.connect(pg_db) as conn:
        expected = [{"lvl": r[0], "name": r[1], "n": r[2]} for r in conn.execute(
            "SELECT r.lvl::text, r.name, r.n FROM snap_other.readings r "
            "ORDER BY r.lvl, r.name, r.n")]
        progress = conn.execute("SELECT rows, finished_at IS NOT NULL FROM dx.snapshot_progress "
                                "WHERE entity = 'snap_other.readings'").fetchone()
    events = outbox(pg_db, "snap_other.readings")
    assert [op for op, _ in events] == ["r"] * 45
    assert [k for _, k in events] == expected  # each key once, in the key columns' order
    assert progress == (45, True)


def test_refuses_without_current_capture_and_changes_no_triggers(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    execute(pg_db, "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0, w int)",
            "INSERT INTO t (id) SELECT g FROM generate_series(1, 10) g")
    yaml_text = "  - name: t\n    columns: [id, v]\n"
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, yaml_text)
    with psycopg.connect(pg_db, autocommit=True) as conn:
        ensure_schema(conn, load_config(cfg))
    with pytest.raises(CatalogError, match=r"not installed on public\.t; run 'dx capture install'"):
        run_snapshot(pg_db, load_config(cfg))

    capture(stack, pg_db, topic_prefix, tmp_path, yaml_text)
    installed = trigger_oids(pg_db, "t")
    # A reader holds ACCESS SHARE on the table: any DROP/CREATE TRIGGER would wait on it.
    reader = psycopg.connect(pg_db)
    reader.execute("SELECT count(*) FROM t")
    try:
        with psycopg.connect(pg_db, autocommit=True, options="-c lock_timeout=2s") as conn:
            assert snapshot_table(conn, load_config(cfg), 0, chunk=4) == 10
    finally:
        reader.close()
    assert trigger_oids(pg_db, "t") == installed

    # dx.yaml now exposes w too: the snapshot must not apply that drift, only refuse.
    write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                 "  - name: t\n    columns: [id, v, w]\n")
    with psycopg.connect(pg_db) as conn:
        specs = conn.execute("SELECT count(*) FROM dx.capture_spec").fetchone()
    res = dx("snapshot", "public.t", "-c", str(cfg))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "dx: error: capture on public.t is not up to date with dx.yaml and the database "
        "(see 'dx capture status'); run 'dx capture install' first"]
    assert trigger_oids(pg_db, "t") == installed
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT count(*) FROM dx.capture_spec").fetchone() == specs
    assert [op for op, _ in outbox(pg_db, "public.t")] == ["r"] * 10
