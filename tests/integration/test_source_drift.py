"""Catalog drift under a running source worker: a column dropped while the worker runs gives
one line naming the dx.yaml line of the configured column (non-zero exit, no traceback), or,
for a route that writes every column, the worker re-reads the table and carries on; ``dx
import`` against the changed table is one line too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

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


def test_import_after_a_dropped_column_is_one_line(stack: Any, pg_db: str, topic_prefix: str,
                                                   tmp_path: Path) -> None:
    _, cfg = stock_route(stack, pg_db, topic_prefix, tmp_path, create=False,
                         extra="    columns: [sku, qty, note]\n")
    (tmp_path / "in.csv").write_text("sku,qty,note\nc,3,z\n")
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "import", str(tmp_path / "in.csv"),
                          "-e", "stock", "-c", str(cfg)], capture_output=True, text=True,
                         timeout=120)
    lines = [ln for ln in run.stderr.splitlines() if ln.strip() and "━" not in ln]
    assert run.returncode == 1 and lines == [
        f"dx: error: {cfg}:14: column 'note' does not exist in public.stock (columns: sku, qty)"
    ], run.stderr
