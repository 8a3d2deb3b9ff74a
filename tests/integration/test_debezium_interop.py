"""Debezium's own tools read dx's topics: Debezium's JDBC sink (Kafka Connect, Apicurio's Avro
converter in Confluent wire format) replicates a table of every PostgreSQL type dx exposes into a
second database, and Debezium's ExtractNewRecordState SMT flattens dx's events for Kafka
Connect's file sink. The connector configurations here are the ones the README shows."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from connect_worker import Connect, avro_converter
from psycopg import sql
from relay_support import dx, execute, relay_thread, write_config

from pipeline.events.avro import micro_duration

pytestmark = pytest.mark.timeout(900)  # the first run downloads Connect from Maven Central

SCHEMA_DDL = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive_int AS int4 CHECK (VALUE > 0);
CREATE DOMAIN price AS numeric(12,3);
CREATE TABLE everything (
    id int8 PRIMARY KEY,
    c_int2 int2, c_int4 int4, c_int8 int8,
    c_text text, c_varchar varchar(200),
    c_numeric numeric(10,2), c_numeric_wide numeric(38,10), c_number numeric,
    c_bool boolean, c_float4 float4, c_float8 float8,
    c_date date, c_ts timestamp, c_tstz timestamptz, c_time time, c_timetz timetz,
    c_interval interval,
    c_uuid uuid, c_json json, c_jsonb jsonb, c_bytea bytea,
    c_text_arr text[], c_int_arr int4[],
    c_mood mood, c_positive positive_int, c_price price
);
"""
COLUMNS = ["id", "c_int2", "c_int4", "c_int8", "c_text", "c_varchar", "c_numeric",
           "c_numeric_wide", "c_number", "c_bool", "c_float4", "c_float8", "c_date", "c_ts",
           "c_tstz", "c_time", "c_timetz", "c_interval", "c_uuid", "c_json", "c_jsonb",
           "c_bytea", "c_text_arr", "c_int_arr", "c_mood", "c_positive", "c_price"]

ROWS = [
    # ordinary values
    """INSERT INTO everything VALUES (1, 12, 1234, 123456789012, 'plain', 'varchar',
       12.5, 1.25, 3.14159, true, 1.5, 2.25, '2026-11-29', '2026-11-29 12:34:56.123456',
       '2026-11-29 12:34:56.5+01', '12:34:56.789', '12:34:56+02', '1 year 2 mons 3 days 04:05:06',
       'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2.5, "x"]}', '{"b": {"c": null}}',
       '\\x00ff10', '{a,"b c",NULL}', '{1,2,3}', 'happy', 7, 12.345)""",
    # every column NULL
    "INSERT INTO everything (id) VALUES (2)",
    # edges: extreme integers and timestamps, NaN/Infinity, large numerics, empty arrays,
    # negative intervals, odd time zones, unicode
    """INSERT INTO everything VALUES (3, -32768, 2147483647, -9223372036854775808, '', 'ünï €🙂',
       -99999999.99, 1234567890123456789012345678.0123456789,
       -123456789012345678901234567890.123456789012345, false, '-Infinity', 'NaN',
       '1900-01-01', '1900-01-01 00:00:00', '9999-12-31 23:59:59.999999+00', '23:59:59.999999',
       '00:00:00-05:30', '-1 years -2 mons +3 days -04:05:06.5',
       '00000000-0000-0000-0000-000000000000', '[]', '{}', '\\x', '{}', '{}', 'sad',
       2147483647, -0.001)""",
    """SET LOCAL TimeZone = 'Asia/Kathmandu'""",
    """INSERT INTO everything (id, c_tstz, c_float8, c_float4, c_number, c_ts)
       VALUES (4, '2026-06-01 12:00:00-07', 'Infinity', 'NaN', 0, '2000-02-29 23:59:59')""",
]
CHANGES = [
    # update every kind of column
    """UPDATE everything SET c_text = 'changed', c_numeric = 0.01, c_number = 1e-20,
       c_tstz = '2000-01-01 00:00:00+00', c_interval = '0', c_text_arr = '{}', c_bytea = NULL,
       c_mood = 'ok', c_jsonb = '[1, {"k": "v"}]' WHERE id = 1""",
    # a key change (dx: delete of the old key + create of the new one)
    "UPDATE everything SET id = 30 WHERE id = 3",
    "DELETE FROM everything WHERE id = 2",
    "UPDATE everything SET c_int4 = NULL, c_tstz = NULL WHERE id = 4",
]


def _with_db(url: str, name: str) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, f"/{name}", p.query, p.fragment))


@pytest.fixture
def replicas(stack: Any) -> Iterator[tuple[str, str]]:
    """Two more databases: one with the source's DDL, one left empty for the sink to fill."""
    names = [f"dxt_replica_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("ddl", "auto")]
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_db(stack.database_url, names[0]), _with_db(stack.database_url, names[1])
    finally:
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            for name in names:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                             .format(sql.Identifier(name)))


def jdbc_url(db_url: str) -> str:
    p = urlsplit(db_url)
    # stringtype=unspecified lets PostgreSQL type the enum column's text (Debezium's JDBC sink
    # binds io.debezium.data.Enum as varchar); no other type needs it.
    return f"jdbc:postgresql://{p.hostname}:{p.port}{p.path}?stringtype=unspecified"


def jdbc_sink(stack: Any, topic: str, db_url: str, table: str, *, create: bool) -> dict[str, str]:
    """Debezium's JDBC sink on a dx topic: upserts by the record key, deletes on delete events
    and tombstones; `create` lets it create (and evolve) the table itself."""
    p = urlsplit(db_url)
    return {
        "connector.class": "io.debezium.connector.jdbc.JdbcSinkConnector",
        "tasks.max": "1",
        "topics": topic,
        "connection.url": jdbc_url(db_url),
        "connection.username": p.username or "",
        "connection.password": p.password or "",
        "insert.mode": "upsert",
        "delete.enabled": "true",
        "primary.key.mode": "record_key",
        "schema.evolution": "basic" if create else "none",
        "collection.name.format": table,
        **avro_converter(stack.schema_registry_url, "key.converter"),
        **avro_converter(stack.schema_registry_url, "value.converter"),
    }


def rows(db_url: str, table: str = "everything") -> dict[int, dict[str, Any]]:
    """Rows by id as psycopg loads them. Intervals compare as PostgreSQL's `=` does (a month is
    30 days): Debezium's MicroDuration carries '1 mon' as 30 days' microseconds, so the replica
    holds '30 days', equal to the source's '1 mon' but not the same text."""
    cols = sql.SQL(", ").join(
        sql.SQL("{}::text").format(sql.Identifier(c)) if c == "c_interval" else sql.Identifier(c)
        for c in COLUMNS)
    with psycopg.connect(db_url) as conn:
        cur = conn.execute(sql.SQL("SELECT {} FROM {}").format(cols, sql.Identifier(table)))
        found = {r[0]: dict(zip(COLUMNS, r, strict=True)) for r in cur}
    for row in found.values():
        if row["c_interval"] is not None:
            row["c_interval"] = micro_duration(row["c_interval"])
    return found


def same(a: Any, b: Any) -> bool:
    """Equal as PostgreSQL would say (NaN equals NaN), for values psycopg loaded."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def differences(source: str, replica: str, lossy: frozenset[str] = frozenset()) -> list[str]:
    """Column-by-column differences; `lossy` columns (a double where the source has numeric)
    compare as the source value rounded to a double."""
    want, got = rows(source), rows(replica)
    if set(want) != set(got):
        return [f"keys {sorted(want)} != {sorted(got)}"]
    return [f"id {k} {c}: {want[k][c]!r} != {got[k][c]!r}"
            for k in sorted(want) for c in COLUMNS
            if not same(float(want[k][c]) if c in lossy and want[k][c] is not None
                        else want[k][c], got[k][c])]


def wait_replicated(connect: Connect, sinks: list[str], source: str, replica: str,
                    lossy: frozenset[str] = frozenset(), timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    diff: list[str] = ["not compared yet"]
    while time.monotonic() < deadline:
        for name in sinks:
            connect.wait_running(name, timeout=60)  # a FAILED task ends the test with its cause
        try:
            diff = differences(source, replica, lossy)
        except psycopg.errors.UndefinedTable:
            diff = ["replica table not created yet"]
        if not diff:
            return
        time.sleep(1)
    raise AssertionError("replica differs: " + "; ".join(diff[:10]))


def test_jdbc_sink_replicates_every_type_into_typed_tables(
        stack: Any, connect: Connect, pg_db: str, replicas: tuple[str, str],
        topic_prefix: str, tmp_path: Path, capture_mode: str) -> None:
    by_ddl, auto = replicas
    execute(pg_db, SCHEMA_DDL)
    execute(by_ddl, SCHEMA_DDL)
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       f"  - name: everything\n    columns: [{', '.join(COLUMNS)}]\n",
                       capture_mode=capture_mode)
    res = dx("capture", "install", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    topic = f"{topic_prefix}.public.everything"
    sinks = {f"{topic_prefix}-ddl": jdbc_sink(stack, topic, by_ddl, "everything", create=False),
             f"{topic_prefix}-auto": jdbc_sink(stack, topic, auto, "everything", create=True)}
    with psycopg.connect(pg_db) as conn:
        for statement in ROWS:
            conn.execute(statement)  # type: ignore[arg-type]
    try:
        with relay_thread(cfg):
            for name, config in sinks.items():
                connect.create(name, config)
            wait_replicated(connect, list(sinks), pg_db, by_ddl)
            wait_replicated(connect, list(sinks), pg_db, auto, AUTO_LOSSY)

            execute(pg_db, *CHANGES)
            wait_replicated(connect, list(sinks), pg_db, by_ddl)
            wait_replicated(connect, list(sinks), pg_db, auto, AUTO_LOSSY)

            # a snapshot repairs what was changed behind the sinks' backs
            for replica in (by_ddl, auto):
                execute(replica, "UPDATE everything SET c_text = 'tampered' WHERE id = 1",
                        "DELETE FROM everything WHERE id = 30")
            res = dx("snapshot", "public.everything", "-c", str(cfg))
            assert res.returncode == 0, res.stderr
            wait_replicated(connect, list(sinks), pg_db, by_ddl)
            wait_replicated(connect, list(sinks), pg_db, auto, AUTO_LOSSY)
    finally:
        for name in sinks:
            connect.delete(name)

    # the column types Debezium's sink chose from dx's schemas when it created the table
    with psycopg.connect(auto) as conn:
        chosen = dict(conn.execute(
            "SELECT column_name, format_type(atttypid, atttypmod) FROM information_schema.columns"
            " JOIN pg_attribute ON attrelid = 'everything'::regclass AND attname = column_name"
            " WHERE table_name = 'everything'").fetchall())
    assert chosen == CHOSEN_TYPES, chosen


# Debezium's JDBC sink makes an unconstrained numeric (VariableScaleDecimal) a double precision
# column when it creates the table: create such tables yourself to keep every digit.
AUTO_LOSSY = frozenset({"c_number"})

# What Debezium's JDBC sink creates for each column of dx's topic (checked against the source's
# types in the README: enums arrive as text, domains as their base type).
CHOSEN_TYPES = {
    "id": "bigint", "c_int2": "smallint", "c_int4": "integer", "c_int8": "bigint",
    "c_text": "text", "c_varchar": "character varying(200)", "c_numeric": "numeric(10,2)",
    "c_numeric_wide": "numeric(38,10)", "c_number": "double precision", "c_bool": "boolean",
    "c_float4": "real", "c_float8": "double precision", "c_date": "date",
    "c_ts": "timestamp(6) without time zone", "c_tstz": "timestamp(6) with time zone",
    "c_time": "time(6) without time zone", "c_timetz": "time(6) with time zone",
    "c_interval": "interval", "c_uuid": "uuid", "c_json": "json", "c_jsonb": "jsonb",
    "c_bytea": "bytea", "c_text_arr": "text[]", "c_int_arr": "integer[]", "c_mood": "text",
    "c_positive": "integer", "c_price": "numeric(12,3)",
}


def test_extract_new_record_state_flattens_dx_events_for_the_file_sink(
        stack: Any, connect: Connect, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    execute(pg_db, "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2), "
                   "seen timestamptz)")
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: items\n    columns: [id, name, price, seen]\n")
    assert dx("capture", "install", "-c", str(cfg)).returncode == 0
    out = tmp_path / "items.jsonl"
    name = f"{topic_prefix}-file"
    execute(pg_db, "INSERT INTO items VALUES (1, 'a', 1.50, '2026-11-29 10:00:00+00'), "
                   "(2, 'b', NULL, NULL)",
            "UPDATE items SET name = 'a2' WHERE id = 1", "DELETE FROM items WHERE id = 2")
    try:
        with relay_thread(cfg):
            connect.create(name, {
                "connector.class": "org.apache.kafka.connect.file.FileStreamSinkConnector",
                "tasks.max": "1",
                "topics": f"{topic_prefix}.public.items",
                "file": str(out),
                "transforms": "unwrap",
                "transforms.unwrap.type": "io.debezium.transforms.ExtractNewRecordState",
                "transforms.unwrap.delete.tombstone.handling.mode": "rewrite",
                "transforms.unwrap.add.fields": "op,source.ts_ms,source.txId",
                **avro_converter(stack.schema_registry_url, "key.converter"),
                **avro_converter(stack.schema_registry_url, "value.converter"),
            })
            deadline = time.monotonic() + 120
            lines: list[str] = []
            while time.monotonic() < deadline and len(lines) < 4:
                connect.wait_running(name, timeout=60)
                lines = out.read_text().splitlines() if out.exists() else []
                time.sleep(0.5)
    finally:
        connect.delete(name)
    # The file sink writes each value with Struct.toString: flattened rows, no envelope.
    assert len(lines) == 4, lines
    assert all(line.startswith("Struct{") and "before=" not in line for line in lines), lines
    assert "id=1,name=a,price=1.50,seen=2026-11-29T10:00:00Z," in lines[0]
    assert "__op=c" in lines[0] and "__deleted=false" in lines[0] and "__source_txId=" in lines[0]
    assert "Struct{id=2,name=b,__deleted=false," in lines[1] and "__op=c" in lines[1]  # no nulls
    assert "id=1,name=a2," in lines[2] and "__op=u" in lines[2]
    assert "id=2," in lines[3] and "__deleted=true" in lines[3] and "__op=d" in lines[3]
