"""The task table's indexes and the reads they serve, on real PostgreSQL: an upgrade builds a
missing index CONCURRENTLY (writers are not blocked), replaces one a failed build left INVALID,
leaves them to ``dx init`` when called inside a transaction; key lookups use the key index and
still find either key form; the dashboard's counts are exact for what operators act on and
estimated (and say so) past a cap for the rest."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline.tasks.query import count, counts, page
from pipeline.tasks.store import INDEXES, TaskFilter, TaskRow, ensure_schema

pytestmark = pytest.mark.integration


def _valid(conn: psycopg.Connection[Any]) -> dict[str, bool]:
    return {str(n): bool(v) for n, v in conn.execute(
        "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = 'dx.task'::regclass")}


def _fill(conn: psycopg.Connection[Any], n: int) -> None:
    conn.execute(
        "INSERT INTO dx.task (route, topic, partition, \"offset\", key, status, error) "
        "SELECT 'r' || (i %% 2), 't', 0, i, '{\"id\": ' || i || '}', "
        "CASE WHEN i %% 10 = 0 THEN 'dead' ELSE 'succeeded' END, "
        "CASE WHEN i %% 10 = 0 THEN 'HTTP 503 timeout' END FROM generate_series(1, %s) i", (n,))


def test_an_upgrade_builds_missing_indexes_concurrently_while_writers_write(
        pg_db: str, caplog: pytest.LogCaptureFixture) -> None:
    with psycopg.connect(pg_db, autocommit=True) as conn:
        ensure_schema(conn)
        _fill(conn, 20_000)
        # an older dx: two indexes missing, one left INVALID by a build that failed halfway
        conn.execute("DROP INDEX dx.task_key_values_idx")
        conn.execute("DROP INDEX dx.task_status_id_idx")
        conn.execute("UPDATE pg_index SET indisvalid = false "
                     "WHERE indexrelid = 'dx.task_key_id_idx'::regclass")
        assert _valid(conn)["task_key_id_idx"] is False

        # a writer holds a row lock on dx.task the whole time: a plain CREATE INDEX would wait
        # for it (and block every writer after it); CONCURRENTLY only waits for it to end
        writer = psycopg.connect(pg_db)
        writer.execute("INSERT INTO dx.task (route, topic, partition, \"offset\", status) "
                       "VALUES ('r0', 't', 1, 1, 'pending')")
        builder = psycopg.connect(pg_db, autocommit=True)
        built = threading.Thread(target=ensure_schema, args=(builder,),
                                 kwargs={"build_indexes": True})
        built.start()
        built.join(2)
        assert built.is_alive()  # waiting for the writer's transaction, not failing
        # ... and other writers are not blocked meanwhile
        with psycopg.connect(pg_db, autocommit=True) as other:
            other.execute("SET lock_timeout = '5s'")
            other.execute("INSERT INTO dx.task (route, topic, partition, \"offset\", status) "
                          "VALUES ('r0', 't', 2, 1, 'pending')")
        # ... nor a worker starting meanwhile (it does not wait for the build, only warns)
        starting = threading.Thread(target=ensure_schema,
                                    args=(psycopg.connect(pg_db, autocommit=True),))
        starting.start()
        starting.join(30)
        assert not starting.is_alive() and built.is_alive()
        writer.commit()
        writer.close()
        built.join(120)
        assert not built.is_alive()
        assert all(_valid(conn)[n] for n in INDEXES), _valid(conn)

        # inside a transaction nothing is built: one warning names the command that does it
        conn.execute("DROP INDEX dx.task_status_id_idx")
        with psycopg.connect(pg_db) as intx, caplog.at_level(logging.WARNING):
            intx.execute("SELECT 1")
            ensure_schema(intx, build_indexes=True)
        assert "run 'dx init'" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING):  # a worker's start: no build, a warning
            ensure_schema(conn)
        assert "run 'dx init'" in caplog.text and "task_status_id_idx" not in _valid(conn)
        ensure_schema(conn, build_indexes=True)
        assert _valid(conn)["task_status_id_idx"] is True


def test_key_lookups_use_the_key_index_and_find_either_form(pg_db: str) -> None:
    with psycopg.connect(pg_db, autocommit=True) as conn:
        ensure_schema(conn)
        _fill(conn, 20_000)
        conn.execute("INSERT INTO dx.task (route, topic, partition, \"offset\", key, status) "
                     "VALUES ('src', 't', 9, 1, '[777]', 'dead'), "
                     "('src', 't', 9, 2, 'not {json', 'dead'), "
                     "('src', 't', 9, 3, '{broken', 'dead')")
        conn.execute("ANALYZE dx.task")
        for typed in ('{"id":777}', "[777]", "777"):
            found = page(conn, TaskFilter(key=typed)).rows
            assert sorted(r["key"] for r in found) == ['[777]', '{"id": 777}'], typed
        assert [r["key"] for r in page(conn, TaskFilter(key="{broken")).rows] == ["{broken"]
        where, params = TaskFilter(key="777").where()
        plan = "\n".join(str(r[0]) for r in conn.execute(
            psycopg.sql.SQL("EXPLAIN SELECT id FROM dx.task{} ORDER BY id DESC LIMIT 51")
            .format(where), params))
        assert "task_key_values_idx" in plan and "Seq Scan" not in plan, plan


def test_counts_are_exact_where_operators_act_and_estimated_past_the_cap(pg_db: str) -> None:
    with psycopg.connect(pg_db, autocommit=True) as conn:
        ensure_schema(conn)
        _fill(conn, 20_000)
        conn.execute("ANALYZE dx.task")
        found = counts(conn, exact_up_to=1000)
        assert found.by_route["r0"]["dead"] == 2000 and "dead" not in found.by_route["r1"]
        assert found.estimated == {("r0", "succeeded"), ("r1", "succeeded")}
        # the planner's estimate, from the (route, status) statistics
        assert 7000 <= found.by_route["r0"]["succeeded"] <= 9000
        assert 9000 <= found.by_route["r1"]["succeeded"] <= 11000
        exact = counts(conn, exact_up_to=20_000)  # under the cap everything is counted
        assert exact.estimated == set() and exact.by_route["r0"]["succeeded"] == 8000
        assert count(conn, TaskFilter(status=["succeeded"]), cap=100) == 101
        assert count(conn, TaskFilter(status=["dead"], text="TIMEOUT")) == 2000
        # what an action applies to: only its statuses (succeeded: none, without a query)
        assert count(conn, TaskFilter(route="r0"), "retry") == 2000
        assert count(conn, TaskFilter(status=["succeeded", "dead"]), "skip") == 2000
        assert count(conn, TaskFilter(status=["succeeded"]), "retry") == 0
        # several statuses: newest first across them, pages continue where they stopped
        f = TaskFilter(status=["dead", "succeeded"], route="r0")
        first = page(conn, f, size=7)
        second = page(conn, f, before=first.next_before, size=7)
        ids = [r["id"] for r in first.rows + second.rows]
        assert ids == sorted(ids, reverse=True) and ids[0] == 20_000 and len(set(ids)) == 14
        assert [r["status"] for r in first.rows].count("dead") == 2  # 20000, 19990


def test_a_task_row_still_writes_with_the_key_function_in_an_index(pg_db: str) -> None:
    """The index calls dx.task_key_values on every write: keys that are no JSON must not fail
    the worker's batch."""
    from pipeline.tasks.store import UPSERT

    with psycopg.connect(pg_db) as conn:
        ensure_schema(conn)
        for i, key in enumerate(('{"id":1}', "[1, 2]", "{not json", "[", "sku-1", None)):
            conn.execute(UPSERT, TaskRow("r", "t", 0, i, "succeeded", key=key).params())
        conn.commit()
        assert conn.execute("SELECT count(*) FROM dx.task").fetchone() == (6,)


def test_dx_init_builds_an_index_a_new_version_adds(pg_db: str, stack: Any,
                                                    tmp_path: Path) -> None:
    """The upgrade path an operator runs: a worker's start only warns, ``dx init`` builds."""
    from tests.integration.test_sink_support import dx, write_config

    with psycopg.connect(pg_db, autocommit=True) as conn:
        ensure_schema(conn)
        _fill(conn, 1000)
        conn.execute("DROP INDEX dx.task_key_values_idx")
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, "idx", "  []")
    done = dx(cfg, "init")
    assert done.returncode == 0, done.stderr
    with psycopg.connect(pg_db, autocommit=True) as conn:
        assert _valid(conn)["task_key_values_idx"] is True
