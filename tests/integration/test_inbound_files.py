"""File drops into a source route: a file still being written (temporary name, or no ``.done``
marker yet) is not read; a complete one goes through dx import's checks and moves to done/ or
failed/ (with its reject file, line numbers and reasons); the same file dropped twice applies
once."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline.config.loader import load_config
from pipeline.errors import ServiceUnavailable
from pipeline.inbound.files import Watcher
from tests.integration.test_inbound_support import (
    free_port,
    inbound_config,
    products_table,
    rows,
    writes,
)
from tests.integration.test_source_support import run_worker

pytestmark = pytest.mark.integration

CSV_TEXT = "id,sku,name,price,seq\n1,sku-1,product 1,1.50,1\n2,sku-2,product 2,2.50,1\n" \
           "3,sku-3,\"multi\nline\",3.50,1\n"


def scan(cfg: Path) -> list[tuple[str, str, int, int]]:
    w = Watcher(load_config(cfg), "products")
    try:
        return [(o.name, o.status, o.rows, o.rejected) for o in w.run(once=True)]
    finally:
        w.close()


def test_dropped_files_apply_once_partial_files_wait_and_bad_lines_are_rejected(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str) -> None:
    products_table(pg_db)
    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products",
                         f"      files: {{directory: {drop}, complete: rename}}\n")
    partial = drop / "products-1.csv.tmp"
    partial.write_text(CSV_TEXT[:40])  # a writer half-way through
    hidden = drop / ".products-1.csv"
    hidden.write_text(CSV_TEXT[:40])
    assert scan(cfg) == []
    assert partial.exists() and hidden.exists()
    hidden.unlink()
    partial.write_text(CSV_TEXT)
    partial.rename(drop / "products-1.csv")
    assert scan(cfg) == [("products-1.csv", "done", 3, 0)]
    assert (drop / "done" / "products-1.csv").read_text() == CSV_TEXT

    (drop / "products-again.csv").write_text(CSV_TEXT)  # dropped twice, another name
    (drop / "products-1.csv").write_text(CSV_TEXT)  # and under the same name
    assert sorted(scan(cfg)) == [("products-1.csv", "duplicate", 0, 0),
                                 ("products-again.csv", "duplicate", 0, 0)]
    assert sorted(p.name for p in (drop / "done").iterdir()) == [
        "products-1.csv", "products-1.csv.1", "products-again.csv"]

    lines = [json.dumps({"id": 4, "sku": "sku-4", "name": "four", "price": 4, "seq": 1}),
             "",
             json.dumps({"id": 5, "sku": "sku-5", "name": "five", "price": "abc", "seq": 1}),
             '{"id": 6, "sku": ',
             json.dumps({"id": 7, "sku": "sku-7", "name": "seven", "seq": 1, "colour": "red"}),
             json.dumps({"id": 8, "sku": "sku-8", "name": "eight", "price": "8.10", "seq": 1})]
    (drop / "more.jsonl").write_text("\n".join(lines) + "\n")
    assert scan(cfg) == [("more.jsonl", "failed", 5, 3)]
    with (drop / "failed" / "more.jsonl.rejects.csv").open(newline="") as f:
        rejects = [(r["line"], r["field"], r["reason"]) for r in csv.DictReader(f)]
    assert [(line, field) for line, field, _ in rejects] == [("3", "price"), ("4", ""),
                                                             ("5", "colour")]
    assert "expected a number" in rejects[0][2] and "not JSON" in rejects[1][2]
    assert (drop / "failed" / "more.jsonl").exists()
    assert tasks(pg_db) == [  # rejected lines are dead tasks too: the task log, the alerts
        (-1, "field 'colour': unknown field (not a writable column of public.products) "
             "(file more.jsonl line 5)"),
        (-1, "field 'price': expected a number, got 'abc' (file more.jsonl line 3)"),
        (-1, "not JSON: Expecting value: line 1 column 17 (char 16) (file more.jsonl line 4)")]

    stats = run_worker(cfg, "products")
    assert stats.applied == 5 and stats.failed == 0  # the duplicates never reached Kafka
    assert sorted(rows(pg_db)) == [1, 2, 3, 4, 8]
    assert rows(pg_db)[3][1] == "multi\nline"
    assert set(writes(pg_db).values()) == {1}


def test_marker_mode_reads_a_file_only_once_its_done_marker_exists(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str) -> None:
    products_table(pg_db)
    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products",
                         f"      files: {{directory: {drop}, complete: marker}}\n")
    (drop / "products.csv").write_text(CSV_TEXT[:50])
    assert scan(cfg) == []
    (drop / "products.csv").write_text(CSV_TEXT)
    (drop / "products.csv.done").touch()
    assert scan(cfg) == [("products.csv", "done", 3, 0)]
    assert not (drop / "products.csv.done").exists()
    (drop / "bad.csv").write_text("id,sku,nope\n1,a,b\n")
    (drop / "bad.csv.done").touch()
    assert scan(cfg) == [("bad.csv", "failed", 0, 0)]
    assert "'nope' is not a field" in (drop / "failed" / "bad.csv.error.txt").read_text()
    ((partition, error),) = tasks(pg_db)
    assert partition == -1 and error.startswith("file bad.csv: ") and "'nope'" in error


def tasks(db_url: str) -> list[tuple[int, str]]:
    with psycopg.connect(db_url) as conn:
        return [(int(p), str(e)) for p, e in conn.execute(
            "SELECT partition, error FROM dx.task WHERE route = 'products' AND status = 'dead' "
            "ORDER BY error").fetchall()]


def test_with_kafka_unreachable_a_file_stays_for_the_next_scan(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str) -> None:
    products_table(pg_db)
    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products",
                         f"      files: {{directory: {drop}, ack_timeout_s: 2}}\n")
    cfg.write_text(cfg.read_text().replace(stack.kafka_bootstrap, f"127.0.0.1:{free_port()}"))
    line = json.dumps({"id": 1, "sku": "a", "name": "one", "seq": 1})
    (drop / "one.jsonl").write_text(line + "\n")
    w = Watcher(load_config(cfg), "products")
    try:
        with pytest.raises(ServiceUnavailable, match="kafka unreachable"):
            w.run(once=True)
    finally:
        w.close()
    assert (drop / "one.jsonl").exists()  # not moved, not recorded: the next scan sends it
    assert not (drop / "failed" / "one.jsonl.rejects.csv").exists()
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT count(*) FROM dx.inbound_file").fetchone() == (0,)
