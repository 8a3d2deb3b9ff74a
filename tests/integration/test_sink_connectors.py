"""The postgres connector against a real PostgreSQL target, alone and behind a sink worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from connectors.base import NOT_ATTEMPTED, Record
from connectors.postgres.configuration import PostgresSettings
from connectors.postgres.connector import PostgresConnector
from pipeline.errors import CatalogError
from tests.integration.test_sink_support import (
    EventProducer,
    create_topic,
    sink_thread,
    tasks,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

DDL = """CREATE TABLE "Items" (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2),
                              attrs jsonb, seq int)"""


def rec(i: int, op: str = "u", **payload: Any) -> Record:
    return Record(event_id=f"e{i}-{op}", op=op, key={"id": i}, payload={"id": i, **payload},
                  topic="t", partition=0, offset=0)


def rows(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as c:
        return c.execute('SELECT id, name, price::text, attrs FROM "Items" ORDER BY id').fetchall()


def test_batch_applies_in_order_and_a_bad_row_fails_alone(pg_db: str) -> None:
    with psycopg.connect(pg_db, autocommit=True) as c:
        c.execute(DDL)
    conn = PostgresConnector(PostgresSettings.model_validate(
        {"type": "postgres", "url": pg_db, "table": "Items"}), route="r")
    conn.open()
    outs = conn.deliver([
        rec(1, name="a", price=1.5, attrs={"c": "red"}), rec(2, name="b"),
        rec(1, name="a2", price="2.25"), rec(2, op="d"),
        rec(3, name=None),            # NOT NULL violation: terminal, alone
        rec(3, name="c"),             # same key after a failure: not attempted
        rec(4, name="d"),
    ])
    assert [o.ok for o in outs] == [True, True, True, True, False, False, True]
    assert outs[4].error is not None and not outs[4].error.transient
    assert "23502" in str(outs[4].error)
    assert outs[5].error is NOT_ATTEMPTED
    assert rows(pg_db) == [(1, "a2", "2.25", {"c": "red"}), (4, "d", None, None)]
    assert not conn.deliver([rec(5, name="e", colour="x")])[0].ok  # not a column
    conn.close()


def test_target_table_and_columns_are_checked_against_the_catalog(pg_db: str) -> None:
    with psycopg.connect(pg_db, autocommit=True) as c:
        c.execute(DDL)
    for settings, msg in [({"table": "nope"}, "does not exist"),
                          ({"table": "Items", "columns": ["id", "colour"]}, "'colour'"),
                          ({"table": "Items", "key": ["sku"]}, "'sku'")]:
        conn = PostgresConnector(PostgresSettings.model_validate(
            {"type": "postgres", "url": pg_db, **settings}), route="r")
        with pytest.raises(CatalogError, match=msg):
            conn.open()
        conn.close()


def test_worker_delivers_to_postgres_with_mapping(stack: Any, pg_db: str, topic_prefix: str,
                                                  tmp_path: Path) -> None:
    with psycopg.connect(pg_db, autocommit=True) as c:
        c.execute(DDL)
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic, partitions=2)
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, f"""
  - name: to-pg
    topics: [{topic}]
    mapping:
      fields:
        id: id
        name: {{template: "{{name}}-{{seq}}"}}
        price: {{from: price, type: decimal}}
        seq: seq
    connector: {{type: postgres, url: "{pg_db}", table: Items}}
""")
    prod = EventProducer(stack, topic, topic_prefix)
    for seq in range(20):
        for i in range(5):
            prod.send(i, seq=seq, price=f"{seq}.50")
    prod.send(4, op="d")
    prod.flush()
    with sink_thread(cfg, "to-pg"):
        wait_for(lambda: len([r for r in tasks(pg_db, "to-pg") if r["status"] == "succeeded"])
                 == 101, 60, what="101 tasks succeeded")
    with psycopg.connect(pg_db) as c:
        got = c.execute('SELECT id, name, price::text, seq FROM "Items" ORDER BY id').fetchall()
    assert got == [(i, "n-19", "19.50", 19) for i in range(4)]


def test_a_batch_held_by_a_row_lock_past_a_revoke_is_rolled_back(pg_db: str) -> None:
    """Review: a batch is one transaction; one waiting on a row lock (or on the connector's
    one connection) past the revoke's wait used to commit after the hand-over, over what the
    partition's new owner wrote meanwhile. The commit now happens only while the worker still
    owns the records' partitions: otherwise the transaction is rolled back and the records
    are not attempted."""
    import threading

    from connectors.base import call_scope

    with psycopg.connect(pg_db, autocommit=True) as c:
        c.execute(DDL)
        c.execute("""INSERT INTO "Items" (id, name) VALUES (1, 'new owner''s')""")
    conn = PostgresConnector(PostgresSettings.model_validate(
        {"type": "postgres", "url": pg_db, "table": "Items"}), route="r")
    conn.open()
    owned = {"yes": True}
    outcome: list[Any] = []

    def deliver() -> None:
        with call_scope(lambda: owned["yes"]):
            outcome.extend(conn.deliver([rec(2, name="old owner's"), rec(1, name="old owner's")]))

    with psycopg.connect(pg_db) as locker:
        locker.execute('SELECT 1 FROM "Items" WHERE id = 1 FOR UPDATE')
        t = threading.Thread(target=deliver)
        t.start()

        def waiting() -> bool:
            with psycopg.connect(pg_db, autocommit=True) as c:
                return bool(c.execute("SELECT count(*) FROM pg_stat_activity WHERE "
                                      "wait_event_type = 'Lock' AND datname = current_database()"
                                      ).fetchone()[0])  # type: ignore[index]

        wait_for(waiting, 30, interval=0.05, what="the batch waiting on the row lock")
        owned["yes"] = False  # the revoke gave up waiting: the partition moved
        locker.rollback()
    t.join(30)
    conn.close()
    assert [o.error for o in outcome] == [NOT_ATTEMPTED, NOT_ATTEMPTED]
    assert rows(pg_db) == [(1, "new owner's", None, None)]
