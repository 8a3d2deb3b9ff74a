"""Capture on partitioned tables and on tables with a DEFERRABLE key, against real PostgreSQL.

Row triggers on a partitioned table are cloned to its partitions; statement triggers with
transition tables and TRUNCATE triggers are not. Row triggers see every row as it is updated,
which a DEFERRABLE key lets pass through states where two rows share a key. dx refuses the
layouts it would capture wrongly, with one line naming the dx.yaml line, and guards every
partition against TRUNCATE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline.capture import ddl, install
from pipeline.capture.catalog import read_table
from pipeline.config.loader import load_config
from tests.integration.relay_support import dx, execute, write_config

ORDERS = [
    "CREATE TABLE orders (id int NOT NULL, region text NOT NULL, v int NOT NULL DEFAULT 0, "
    "PRIMARY KEY (id, region)) PARTITION BY LIST (region)",
    "CREATE TABLE orders_a PARTITION OF orders FOR VALUES IN ('a')",
    "CREATE TABLE orders_b PARTITION OF orders FOR VALUES IN ('b') PARTITION BY RANGE (id)",
    "CREATE TABLE orders_b1 PARTITION OF orders_b FOR VALUES FROM (0) TO (1000)",
]


def orders_config(tmp_path: Path, stack: Any, db: str, prefix: str, extra: str = "") -> Path:
    return write_config(tmp_path / "dx.yaml", stack, db, prefix,
                        "  - name: orders\n    columns: [id, region, v]\n" + extra)


def outbox(db: str, entity: str) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    with psycopg.connect(db) as conn:
        rows = conn.execute("SELECT op, key, after FROM dx.outbox WHERE entity = %s "
                            "ORDER BY id", (entity,)).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def replay(events: list[tuple[str, dict[str, Any], dict[str, Any] | None]]) -> dict[str, Any]:
    """What a compacted topic ends with: the last event per key, deletes removing the key."""
    state: dict[str, Any] = {}
    for op, key, after in events:
        k = repr(sorted(key.items()))
        if op == "d":
            state.pop(k, None)
        else:
            state[k] = after
    return state


def truncate_refused(db: str, table: str) -> bool:
    try:
        execute(db, f"TRUNCATE {table}")
    except psycopg.errors.RaiseException as err:
        assert "would not reach Kafka" in str(err)
        return True
    return False


def dx_triggers(db: str) -> list[tuple[str, str]]:
    with psycopg.connect(db) as conn:
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE t.tgname LIKE 'dx\\_%' AND n.nspname <> 'dx' ORDER BY 1, 2")]


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def refused(res: Any, cfg: Path, line: int, *needles: str) -> None:
    assert res.returncode == 1, res.stdout + res.stderr
    err = res.stderr.strip()
    assert "\n" not in err, err
    assert f"{cfg}:{line}: " in err, err
    for needle in needles:
        assert needle in err, err


def test_row_capture_covers_every_partition_and_guards_them_against_truncate(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    execute(pg_db, *ORDERS)
    cfg = orders_config(tmp_path, stack, pg_db, topic_prefix)
    res = dx("capture", "install", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert dx("capture", "status", "-c", str(cfg)).returncode == 0

    execute(pg_db, "INSERT INTO orders_a (id, region) VALUES (1, 'a')")  # names a partition
    execute(pg_db, "INSERT INTO orders (id, region) VALUES (2, 'b')")  # routed by the parent
    execute(pg_db, "INSERT INTO orders_b1 (id, region) VALUES (3, 'b')")  # a sub-partition
    execute(pg_db, "UPDATE orders_a SET v = 1 WHERE id = 1")
    execute(pg_db, "UPDATE orders_b SET v = 2")
    execute(pg_db, "UPDATE orders SET region = 'b', v = 3 WHERE id = 1")  # moves partition
    execute(pg_db, "DELETE FROM orders_b1 WHERE id = 2")
    events = outbox(pg_db, "public.orders")
    assert [(op, key["id"], key["region"]) for op, key, _ in events] == [
        ("c", 1, "a"), ("c", 2, "b"), ("c", 3, "b"), ("u", 1, "a"), ("u", 2, "b"),
        ("u", 3, "b"), ("d", 1, "a"), ("c", 1, "b"), ("d", 2, "b")]
    with psycopg.connect(pg_db) as conn:
        rows = conn.execute("SELECT id, region, v FROM orders").fetchall()
    assert sorted((a["id"], a["region"], a["v"]) for a in replay(events).values()) == sorted(rows)

    for table in ("orders_a", "orders_b1", "orders_b", "orders"):
        assert truncate_refused(pg_db, table), f"TRUNCATE {table} went through"

    # A partition attached after the install gets the row triggers from PostgreSQL but not the
    # TRUNCATE guard: status reports it until the next install.
    # (schema-qualified: the test role is named dx, so "$user" on the search path is now dx)
    execute(pg_db, "CREATE TABLE public.orders_c (LIKE orders INCLUDING DEFAULTS)",
            "ALTER TABLE orders ATTACH PARTITION public.orders_c FOR VALUES IN ('c')")
    execute(pg_db, "INSERT INTO orders_c (id, region) VALUES (4, 'c')")
    assert outbox(pg_db, "public.orders")[-1][1] == {"id": 4, "region": "c"}
    with psycopg.connect(pg_db, autocommit=True) as conn:
        state = install.table_state(conn, load_config(cfg), 0)
    assert state.installed and not state.current
    assert len(state.problems) == 1
    assert "public.orders_c" in state.problems[0]
    assert "dx capture install" in state.problems[0]
    res = dx("capture", "status", "-c", str(cfg))
    assert res.returncode == 1, res.stdout
    res = dx("capture", "install", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert dx("capture", "status", "-c", str(cfg)).returncode == 0
    assert truncate_refused(pg_db, "orders_c")

    res = dx("capture", "uninstall", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert dx_triggers(pg_db) == []
    execute(pg_db, "TRUNCATE orders_a")


def test_statement_capture_is_refused_on_partitioned_tables_and_partitions(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    execute(pg_db, *ORDERS)
    cfg = orders_config(tmp_path, stack, pg_db, topic_prefix, "    capture: statement\n")
    res = dx("capture", "install", "-c", str(cfg))
    refused(res, cfg, line_of(cfg, "capture: statement"), "public.orders", "is partitioned",
            "use 'capture: row'")
    assert dx_triggers(pg_db) == []

    # the capture.mode default is refused too, pointing at the table
    cfg = orders_config(tmp_path, stack, pg_db, topic_prefix)
    cfg.write_text(cfg.read_text().replace("capture:\n  mode: trigger\n", "") +
                   "capture:\n  mode: statement\n")
    refused(dx("capture", "install", "-c", str(cfg)), cfg, line_of(cfg, "- name: orders"),
            "is partitioned", "use 'capture: row'")

    # a partition named in dx.yaml misses statements that go through its parent
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: orders_a\n    columns: [id, region, v]\n"
                       "    capture: statement\n")
    refused(dx("capture", "install", "-c", str(cfg)), cfg, line_of(cfg, "capture: statement"),
            "public.orders_a", "is a partition", "use 'capture: row'")
    assert dx_triggers(pg_db) == []

    # capture installed in statement mode before this check existed is drift in status
    config = load_config(cfg)
    with psycopg.connect(pg_db, autocommit=True) as conn:
        install.ensure_schema(conn, config)
        spec = read_table(conn, config, 0, check_capture=False)
        with conn.transaction():
            body = ddl.statement_function(spec, 1).as_string(conn)
            for stmt in ddl.install_statements(spec, 1, "statement", body):
                conn.execute(stmt)
        state = install.table_state(conn, config, 0)
    assert state.installed and state.mode == "statement" and not state.current
    assert "use 'capture: row'" in state.problems[0]
    assert dx("capture", "status", "-c", str(cfg)).returncode == 1
    assert dx("capture", "uninstall", "-c", str(cfg)).returncode == 0
    assert dx_triggers(pg_db) == []


def test_tables_whose_changes_capture_would_miss_are_refused(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    execute(pg_db, *ORDERS,
            "CREATE TABLE animals (id int PRIMARY KEY, name text)",
            "CREATE TABLE dogs (breed text) INHERITS (animals)")
    # inheritance: row triggers on the parent never fire for the children's rows
    for mode in ("row", "statement"):
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                           f"  - name: animals\n    columns: [id, name]\n    capture: {mode}\n")
        refused(dx("capture", "install", "-c", str(cfg)), cfg, line_of(cfg, "- name: animals"),
                "public.animals has inheritance children (public.dogs)")
    # a child is captured in row mode: its triggers fire whichever table a statement names
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: dogs\n    columns: [id, name, breed]\n    key: [id]\n")
    assert dx("capture", "install", "-c", str(cfg)).returncode == 0
    execute(pg_db, "INSERT INTO dogs VALUES (1, 'rex', 'collie')",
            "UPDATE animals SET name = 'Rex'")
    assert [op for op, _, _ in outbox(pg_db, "public.dogs")] == ["c", "u"]
    assert truncate_refused(pg_db, "animals")
    assert dx("capture", "uninstall", "-c", str(cfg)).returncode == 0

    # a partition and its parent both in dx.yaml would capture the same rows twice
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: orders\n    columns: [id, region, v]\n"
                       "  - name: orders_b1\n    columns: [id, region, v]\n")
    refused(dx("capture", "install", "-c", str(cfg)), cfg, line_of(cfg, "- name: orders_b1"),
            "public.orders_b1 is a partition of public.orders",
            f"{cfg}:{line_of(cfg, '- name: orders')}")

    # a foreign-table partition changes on its own server and cannot have a TRUNCATE trigger
    # (nor can its parent have a unique index: the key comes from dx.yaml)
    execute(pg_db, "CREATE EXTENSION file_fdw SCHEMA public",
            "CREATE SERVER files FOREIGN DATA WRAPPER file_fdw",
            "CREATE TABLE public.mixed (id int NOT NULL, region text) PARTITION BY LIST (region)",
            "CREATE TABLE public.mixed_a PARTITION OF public.mixed FOR VALUES IN ('a')",
            "CREATE FOREIGN TABLE public.mixed_f PARTITION OF public.mixed FOR VALUES IN ('f') "
            "SERVER files OPTIONS (filename '/dev/null')")
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: mixed\n    columns: [id, region]\n    key: [id]\n")
    refused(dx("capture", "install", "-c", str(cfg)), cfg, line_of(cfg, "- name: mixed"),
            "foreign-table partitions (public.mixed_f)")
    assert dx_triggers(pg_db) == []

SEATS = ("CREATE TABLE seats (id int, label text NOT NULL, "
         "CONSTRAINT seats_pkey PRIMARY KEY (id) DEFERRABLE)")


def test_row_capture_is_refused_for_a_deferrable_key(stack: Any, pg_db: str, topic_prefix: str,
                                                     tmp_path: Path) -> None:
    execute(pg_db, SEATS,
            "CREATE TABLE later (id int, code int NOT NULL, "
            "CONSTRAINT later_code UNIQUE (code) DEFERRABLE INITIALLY DEFERRED)")
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: seats\n    columns: [id, label]\n    capture: row\n")
    refused(dx("capture", "install", "-c", str(cfg)), cfg, line_of(cfg, "capture: row"),
            "DEFERRABLE constraint seats_pkey", "use 'capture: statement'")
    assert dx_triggers(pg_db) == []
    # with 'key:' the constraint over those columns counts; INITIALLY DEFERRED lets a key repeat
    # between statements, which statement capture cannot order either
    for mode in ("row", "statement"):
        cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                           "  - name: later\n    columns: [id, code]\n    key: [code]\n"
                           f"    capture: {mode}\n")
        refused(dx("capture", "install", "-c", str(cfg)), cfg, line_of(cfg, f"capture: {mode}"),
                "later_code, DEFERRABLE INITIALLY DEFERRED", "NOT DEFERRABLE")
    assert dx_triggers(pg_db) == []


@pytest.mark.parametrize("direction", ["id + 1", "3 - id"])
def test_statement_capture_gets_a_key_shift_right(stack: Any, pg_db: str, topic_prefix: str,
                                                  tmp_path: Path, direction: str) -> None:
    """UPDATE SET id = id + 1 passes through a state with two rows 2; row triggers would emit
    d1 c2 d2 c3 and leave key 2 deleted. Statement capture joins the transition tables."""
    execute(pg_db, SEATS)
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: seats\n    columns: [id, label]\n    capture: statement\n")
    res = dx("capture", "install", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    execute(pg_db, "INSERT INTO seats VALUES (1, 'one'), (2, 'two')")
    execute(pg_db, f"UPDATE seats SET id = {direction}")
    with psycopg.connect(pg_db) as conn:
        rows = conn.execute("SELECT id, label FROM seats").fetchall()
    assert sorted(rows) == ([(2, "one"), (3, "two")] if direction == "id + 1" else
                            [(1, "two"), (2, "one")])
    final = replay(outbox(pg_db, "public.seats"))
    assert sorted((a["id"], a["label"]) for a in final.values()) == sorted(rows)
