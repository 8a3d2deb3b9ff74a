"""File drops into a source route: a file still being written (temporary name, or no ``.done``
marker yet) is not read; a complete one goes through dx import's checks and moves to done/ or
failed/ (with its reject file, line numbers and reasons); the same file dropped twice applies
once."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline.config.loader import load_config
from pipeline.errors import ServiceUnavailable
from pipeline.inbound.files import Watcher, sha256_of
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
    (drop / "bad-again.csv").write_text("id,sku,nope\n1,a,b\n")  # nothing of it was sent:
    (drop / "bad-again.csv.done").touch()  # read again (e.g. after the route was fixed)
    assert scan(cfg) == [("bad-again.csv", "failed", 0, 0)]


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


def test_links_are_not_followed_and_a_file_changed_while_read_is_read_again(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    products_table(pg_db)
    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products",
                         f"      files: {{directory: {drop}}}\n")
    secret = tmp_path / "outside.csv"  # somebody else's file, linked into the drop folder
    secret.write_text("id,sku,name,price,seq\n66,secret,not for dx,6.60,1\n")
    (drop / "link.csv").symlink_to(secret)
    (drop / "failed").mkdir()
    victim = tmp_path / "victim.txt"  # a link planted where dx writes a reject file
    victim.write_text("keep me\n")
    (drop / "failed" / "bad.jsonl.rejects.csv").symlink_to(victim)
    good = json.dumps({"id": 1, "sku": "a", "name": "one", "seq": 1})
    (drop / "bad.jsonl").write_bytes(  # a line that is not UTF-8, one too long: those lines
        (good + "\n").encode() + b'{"id": 2, "name": "\xff"}\n' + b"x" * 300 + b"\n")
    monkeypatch.setattr("pipeline.inbound.files.MAX_LINE_BYTES", 100)
    assert sorted(scan(cfg)) == [("bad.jsonl", "failed", 3, 2), ("link.csv", "failed", 0, 0)]
    assert victim.read_text() == "keep me\n" and secret.exists()
    assert (drop / "failed" / "link.csv").is_symlink()
    assert "symbolic link" in (drop / "failed" / "link.csv.error.txt").read_text()
    with (drop / "failed" / "bad.jsonl.rejects.csv").open(newline="") as f:
        assert [(r["line"], r["reason"][:12]) for r in csv.DictReader(f)] == [
            ("2", "not UTF-8 (b"), ("3", "the line is ")]

    # a writer rewrites a file in place between dx hashing it and reading it
    original = "id,sku,name,price,seq\n5,sku-5,first,5.00,1\n"
    rewritten = "id,sku,name,price,seq\n5,sku-5,second,5.00,2\n"
    (drop / "p.csv").write_text(original)
    hash_file = sha256_of

    def hash_then_rewrite(path: Path) -> str:
        digest = hash_file(path)
        if path.read_text() == original:
            path.write_text(rewritten)
        return digest
    monkeypatch.setattr("pipeline.inbound.files.sha256_of", hash_then_rewrite)
    assert scan(cfg) == [("p.csv", "changed", 1, 0)]
    assert (drop / "p.csv").exists()  # left for the next scan, nothing recorded
    assert scan(cfg) == [("p.csv", "done", 1, 0)]
    monkeypatch.setattr("pipeline.inbound.files.sha256_of", hash_file)
    (drop / "p-again.csv").write_text(original)  # the first content was never processed
    assert scan(cfg) == [("p-again.csv", "done", 1, 0)]
    stats = run_worker(cfg, "products")
    assert stats.failed == 0
    assert sorted(rows(pg_db)) == [1, 5] and rows(pg_db)[5][1] == "first"


def test_a_folder_problem_is_one_error_line_and_the_file_stays(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str) -> None:
    products_table(pg_db)
    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products",
                         f"      files: {{directory: {drop}}}\n")
    (drop / "done").write_text("a file where the done/ folder should be\n")
    (drop / "p.csv").write_text(CSV_TEXT)
    cmd = [sys.executable, "-m", "pipeline.cli", "inbound", "watch", "products", "--once",
           "-c", str(cfg)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=False)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dx: error: watch products: "), out.stderr
    assert "File exists" in lines[0] and (drop / "p.csv").exists()
    with psycopg.connect(pg_db) as conn:  # and a problem in dx status
        (error,) = conn.execute("SELECT last_error FROM dx.inbound_state WHERE kind = 'files'"
                                ).fetchone() or ("",)
    assert "File exists" in error
