"""Bad configuration and unreachable services: one clear line, a non-zero exit, nothing lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from tests.integration.relay_support import TopicReader, dx, execute, relay_thread, write_config


def one_error_line(res: Any) -> str:
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("dx: error: ")
    assert "Traceback" not in res.stderr
    return str(lines[0])


def test_table_without_primary_key_names_file_and_line(stack: Any, pg_db: str,
                                                        topic_prefix: str, tmp_path: Path) -> None:
    execute(pg_db, "CREATE TABLE log (msg text)")
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: log\n    columns: [msg]\n")
    line = one_error_line(dx("capture", "install", "-c", str(cfg)))
    assert f"{cfg}:" in line and "no primary key" in line


def test_unknown_column_names_file_line_and_column(stack: Any, pg_db: str, topic_prefix: str,
                                                   tmp_path: Path) -> None:
    execute(pg_db, "CREATE TABLE t (id int PRIMARY KEY, a text)")
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: t\n    columns: [id, nope]\n")
    line = one_error_line(dx("validate", "-c", str(cfg)))
    text = cfg.read_text().splitlines()
    lineno = next(i for i, ln in enumerate(text, 1) if "nope" in ln)
    assert f"{cfg}:{lineno}:" in line and "'nope'" in line


def test_unknown_key_in_config(stack: Any, pg_db: str, topic_prefix: str,
                               tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: t\n    columns: [id]\n    colums: [x]\n")
    line = one_error_line(dx("validate", "--offline", "-c", str(cfg)))
    assert "unknown key 'colums'" in line and f"{cfg}:" in line


def test_unreachable_broker_is_one_line(stack: Any, pg_db: str, topic_prefix: str,
                                        tmp_path: Path) -> None:
    execute(pg_db, "CREATE TABLE t (id int PRIMARY KEY)")
    ok = write_config(tmp_path / "ok.yaml", stack, pg_db, topic_prefix,
                      "  - name: t\n    columns: [id]\n")
    assert dx("capture", "install", "-c", str(ok)).returncode == 0
    text = ok.read_text().replace(stack.kafka_bootstrap, "127.0.0.1:1")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("relay:\n", "relay:\n  mode: at-least-once\n", 1)
                   .replace("  mode: exactly-once\n", ""))
    line = one_error_line(dx("relay", "-c", str(bad), timeout=60))
    assert "kafka unreachable at 127.0.0.1:1" in line


def test_unreachable_database_is_one_line(stack: Any, topic_prefix: str, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "dx.yaml", stack, "postgresql://dx:secret@127.0.0.1:1/dx",
                       topic_prefix, "  - name: t\n    columns: [id]\n")
    line = one_error_line(dx("status", "-c", str(cfg)))
    assert "postgresql unreachable at 127.0.0.1:1/dx" in line
    assert "secret" not in line


def test_unreachable_registry_stops_without_losing_events(stack: Any, pg_db: str,
                                                          topic_prefix: str,
                                                          tmp_path: Path) -> None:
    execute(pg_db, "CREATE TABLE t (id int PRIMARY KEY)")
    good = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                        "  - name: t\n    columns: [id]\n", mode="at-least-once")
    assert dx("capture", "install", "-c", str(good)).returncode == 0
    execute(pg_db, "INSERT INTO t VALUES (1), (2)")
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace(stack.schema_registry_url,
                                            "http://127.0.0.1:1/apis/ccompat/v7"))
    line = one_error_line(dx("relay", "-c", str(bad), timeout=90))
    assert "schema registry unreachable" in line
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT count(*) FROM dx.outbox").fetchone() == (2,)
    reader = TopicReader(stack, f"{topic_prefix}.public.t")
    with relay_thread(good):
        events = reader.read(until=2, settle_s=0.5)
    reader.close()
    assert [e.key for e in events] == [{"id": 1}, {"id": 2}]


def test_unencodable_row_stops_the_relay_until_quarantined(stack: Any, pg_db: str,
                                                            topic_prefix: str,
                                                            tmp_path: Path) -> None:
    """numeric NaN has no Avro decimal form: the relay names the row and stops (the rows behind
    it wait: nothing overtakes it, nothing is skipped); quarantine keeps it and lets the rest go."""
    execute(pg_db, "CREATE TABLE p (id int PRIMARY KEY, price numeric(10,2))")
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: p\n    columns: [id, price]\n", mode="at-least-once")
    assert dx("capture", "install", "-c", str(cfg)).returncode == 0
    execute(pg_db, "INSERT INTO p VALUES (1, 1.5)", "INSERT INTO p VALUES (2, 'NaN')")
    execute(pg_db, "INSERT INTO p VALUES (3, 3)")
    line = one_error_line(dx("relay", "-c", str(cfg), timeout=90))
    assert "(public.p, key {\"id\": 2}) cannot be encoded: column price: 'NaN'" in line
    position = line.split("dx outbox quarantine ")[1].strip("'")
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT count(*) FROM dx.outbox").fetchone() == (3,)
    res = dx("outbox", "quarantine", position, "--reason", "legacy NaN", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    reader = TopicReader(stack, f"{topic_prefix}.public.p")
    with relay_thread(cfg):
        events = reader.read(until=2, settle_s=1.0)
    reader.close()
    assert [e.key for e in events] == [{"id": 1}, {"id": 3}]
    with psycopg.connect(pg_db) as conn:
        kept = conn.execute("SELECT key, after, reason FROM dx.outbox_quarantine").fetchall()
    assert kept == [({"id": 2}, {"id": 2, "price": "NaN"}, "legacy NaN")]
    again = one_error_line(dx("outbox", "quarantine", position, "-r", "x", "-c", str(cfg)))
    assert "no pending outbox row" in again
