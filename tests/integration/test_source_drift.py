"""Catalog drift under a running source worker: a column dropped while the worker runs gives
one line naming the dx.yaml line of the configured column (non-zero exit, no traceback), or,
for a route that writes every column, the worker re-reads the table and carries on. ``dx
import`` of a bad file (against a changed table, not UTF-8, not CSV) is one line too; a row
with bytes that are not UTF-8 is rejected alone."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline.cli.main import main
from tests.integration.test_sink_support import wait_for
from tests.integration.test_source_support import produce, stock_route, tasks, worker_process


@pytest.mark.parametrize("columns", ["    columns: [sku, qty, note]\n", ""],
                         ids=["configured columns", "every column"])
def test_a_column_dropped_under_the_worker(columns: str, stack: Any, pg_db: str,
                                           topic_prefix: str, tmp_path: Path) -> None:
    topic, cfg = stock_route(stack, pg_db, topic_prefix, tmp_path, extra=columns, table=(
        "CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL, note text)"))

    def count() -> int:
        with psycopg.connect(pg_db) as conn:
            row = conn.execute("SELECT count(*) FROM stock").fetchone()
            return int(row[0]) if row else 0

    produce(stack, topic, [({"sku": "a"}, {"sku": "a", "qty": 1, "note": "x"})])
    worker = worker_process(cfg, "stock", "--stop-when-idle", "20")
    try:
        wait_for(lambda: count() == 1, 60, what="the first row")
        with psycopg.connect(pg_db) as conn:
            conn.execute("ALTER TABLE stock DROP COLUMN note")
        produce(stack, topic, [({"sku": "b"}, {"sku": "b", "qty": 2, "note": "y"}),
                               ({"sku": "c"}, {"sku": "c", "qty": 3})])
        if columns:  # the configured column is gone: stop, naming its line
            _, err = worker.communicate(timeout=120)
            errors = [ln for ln in err.splitlines() if ln.startswith("dx: error:")]
            assert "Traceback" not in err and worker.returncode == 1 and errors == [
                f"dx: error: {cfg}:14: column 'note' does not exist in public.stock "
                "(columns: sku, qty)"], err
            assert count() == 1
            return
        # every column: the table is read again; 'note' is now an unknown field
        wait_for(lambda: count() == 2, 60, what="the row without the dropped column")
        assert [(o, s) for o, s, _ in tasks(pg_db, "stock")] == [(1, "dead")]
    finally:
        if worker.poll() is None:
            worker.terminate()
            worker.communicate(timeout=60)
    assert worker.returncode == 0


BAD_FILES = {
    "a dropped column": (b"sku,qty,note\nc,3,z\n", "columns: [sku, qty, note]",
                         "{cfg}:14: column 'note' does not exist in public.stock "
                         "(columns: sku, qty)"),
    "a latin-1 byte": (b"sku,qty\na,1\nb\xe9,2\nc,3\n", "",
                       "1 of 3 rows rejected; lines and reasons in {csv}.rejects.csv"),
    "a field past the CSV limit": (b"sku,qty\na,1\n" + b"x" * 200_000 + b",2\n", "",
                                   "{csv}:3: not valid CSV: field larger than field limit "
                                   "(131072)"),
    "an undecodable header": (b"sku,q\xffty\na,1\n", "",
                              "{csv}:1: the header is not UTF-8 text (byte 0xff); save the "
                              "file as UTF-8"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_import_of_a_bad_file_is_one_line(case: str, stack: Any, pg_db: str, topic_prefix: str,
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    content, columns, message = BAD_FILES[case]
    _, cfg = stock_route(stack, pg_db, topic_prefix, tmp_path, create=False,
                         extra=f"    {columns}\n" if columns else "")
    csv = tmp_path / "in.csv"
    csv.write_bytes(content)
    monkeypatch.setattr(sys, "argv", ["dx", "import", str(csv), "-e", "stock", "--dry-run",
                                      "-c", str(cfg)])
    with pytest.raises(SystemExit) as exited:
        main()  # anything but a DxError would escape here as an exception: a traceback
    err = [ln for ln in capsys.readouterr().err.splitlines() if "━" not in ln and ln.strip()]
    assert exited.value.code == 1 and err == [
        "dx: error: " + message.format(cfg=cfg, csv=csv)], err
    if case == "a latin-1 byte":  # rejected alone, its bytes kept as they came
        rejects = (tmp_path / "in.csv.rejects.csv").read_bytes().splitlines()
        assert rejects[1:] == [b"3,,not UTF-8 text (byte 0xe9); save the file as UTF-8,b\xe9,2"]


def test_a_batch_the_database_refuses_as_a_whole_is_one_line(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    topic, cfg = stock_route(stack, pg_db, topic_prefix, tmp_path, table=(
        "CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL);"
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = 'stock is read-only today'; END $$;"
        "CREATE TRIGGER refuse BEFORE INSERT ON stock FOR EACH ROW EXECUTE FUNCTION refuse()"))
    produce(stack, topic, [({"sku": "a"}, {"sku": "a", "qty": 1})])
    monkeypatch.setattr(sys, "argv", ["dx", "source", "run", "stock", "--stop-when-idle", "5",
                                      "-c", str(cfg)])
    with pytest.raises(SystemExit) as exited:
        main()
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dx: error:")]
    assert exited.value.code == 1 and errors == [
        "dx: error: route stock: PostgreSQL refused the batch (sqlstate 42501: stock is "
        "read-only today)"], errors
    with psycopg.connect(pg_db) as conn:  # nothing applied, nothing stored: it is retried
        assert conn.execute("SELECT count(*) FROM dx.source_offsets").fetchone() == (0,)
