"""Identifiers from configuration never become SQL text: odd but legal names are captured, and
names that are not in the catalog are refused before any DDL runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from tests.integration.relay_support import TopicReader, dx, execute, relay_thread, write_config


def test_odd_identifiers_are_quoted_not_spliced(stack: Any, pg_db: str, topic_prefix: str,
                                                tmp_path: Path) -> None:
    execute(pg_db, 'CREATE SCHEMA "Shop Data"',
            'CREATE TABLE "Shop Data"."Order-Lines" ("Id" int PRIMARY KEY, '
            '"we""ird $dx$ name" text, "drop table x;--" int)')
    tables = ('  - name: "Shop Data.Order-Lines"\n'
              "    columns: [Id, 'we\"ird $dx$ name', 'drop table x;--']\n"
              "    topic: " + topic_prefix + ".order-lines\n")
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, tables)
    res = dx("capture", "install", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    execute(pg_db, 'INSERT INTO "Shop Data"."Order-Lines" VALUES (1, \'v\', 2)')
    reader = TopicReader(stack, f"{topic_prefix}.order-lines")
    with relay_thread(cfg):
        events = reader.read(until=1, settle_s=0.3)
    reader.close()
    after = events[0].value["after"]  # type: ignore[index]
    # Avro field names are adjusted like Debezium's avro mode; values are intact.
    assert after == {"Id": 1, "we_ird__dx__name": "v", "drop_table_x___": 2}


def test_injection_attempt_in_table_name_is_refused(stack: Any, pg_db: str, topic_prefix: str,
                                                    tmp_path: Path) -> None:
    execute(pg_db, "CREATE TABLE victim (id int PRIMARY KEY)")
    tables = '  - name: "victim; DROP TABLE victim; --"\n    columns: [id]\n'
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, tables)
    res = dx("capture", "install", "-c", str(cfg))
    assert res.returncode == 1 and "does not exist in the database" in res.stderr
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT to_regclass('victim')").fetchone() != (None,)
