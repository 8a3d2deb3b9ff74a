"""CSV through the pipeline against the real stack: 100k rows with a few bad ones land every good
row once and reject the bad ones with their line numbers; importing the same file again changes
nothing; the export is a snapshot of the exposed columns only."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration.test_source_support import create_topic, run_worker, write_config

pytestmark = pytest.mark.integration

N = 100_000
BAD = {  # data row index -> (cells, field, reason fragment)
    17: (["sku-x17", "ok", "abc", "1"], "price", "expected a number"),
    5_000: (["sku-x5000", "", "1.00", "1"], "name", "is null but column 'name' is NOT NULL"),
    42_424: (["sku-x42424", "ok", "1.00", "1.5"], "qty", "expected an integer"),
    77_777: (["sku-x77777", "n" * 41, "1.00", "1"], "name", "allows 40"),
    99_998: (["sku-x99998", "ok", "1.00"], "", "has 3 cells, the header has 4"),
}


def dx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def snapshot(url: str) -> tuple[int, str]:
    """Row count and a digest of every row *and its xmin*: any rewrite changes the digest."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*), md5(string_agg(sku || name || coalesce(price::text, '') || "
            "coalesce(qty::text, '') || xmin::text, ',' ORDER BY sku)) FROM products").fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def test_csv_import_rejects_bad_lines_is_idempotent_and_exports(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str) -> None:
    with psycopg.connect(pg_db) as conn:
        conn.execute("CREATE TABLE products (sku text PRIMARY KEY, name varchar(40) NOT NULL, "
                     "price numeric(10,2), qty int, cost numeric(10,2))")
    topic = f"{topic_prefix}.products.import"
    create_topic(stack, topic, partitions=2)
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, f"""  - name: products-csv
    topic: {topic}
    format: json
    origin: csv
    table: products
    columns: [sku, name, price, qty]
""", tables="""tables:
  - name: products
    columns: [sku, name, price, qty]
""")
    src = tmp_path / "products.csv"
    expected: dict[str, tuple[str, Decimal, int]] = {}
    reject_lines: dict[int, tuple[str, str]] = {}
    with src.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sku", "name", "price", "qty"])
        line = 2
        for i in range(N):
            if i in BAD:
                cells, field, reason = BAD[i]
                w.writerow(cells)
                reject_lines[line] = (field, reason)
                line += 1
                continue
            name = f"product {i}" if i % 1000 else f"multi\nline {i}"  # quoted newline
            w.writerow([f"sku-{i:06d}", name, f"{i % 500}.{i % 100:02d}", i % 13])
            expected[f"sku-{i:06d}"] = (name, Decimal(f"{i % 500}.{i % 100:02d}"), i % 13)
            line += 2 if "\n" in name else 1

    first = dx("import", str(src), "--entity", "products-csv", "-c", str(cfg))
    assert first.returncode == 1, first.stderr
    assert f"{len(BAD)} of {N} rows rejected" in first.stderr
    with (tmp_path / "products.csv.rejects.csv").open(newline="") as f:
        rejects = list(csv.DictReader(f))
    assert {int(r["line"]): r["field"] for r in rejects} == \
        {ln: field for ln, (field, _) in reject_lines.items()}
    for r in rejects:
        assert reject_lines[int(r["line"])][1] in r["reason"], r

    run_worker(cfg, "products-csv", idle_s=2.0)
    count, digest = snapshot(pg_db)
    assert count == N - len(BAD)
    with psycopg.connect(pg_db) as conn:
        got = {sku: (name, price, qty) for sku, name, price, qty in
               conn.execute("SELECT sku, name, price, qty FROM products")}
        task_count = conn.execute("SELECT count(*) FROM dx.task").fetchone()
    assert got == expected
    assert task_count == (0,)

    # The same file again: same events (deterministic keys and ids), and nothing changes.
    again = dx("import", str(src), "--table", "products", "-c", str(cfg))
    assert again.returncode == 1
    run_worker(cfg, "products-csv", idle_s=2.0)
    assert snapshot(pg_db) == (count, digest)

    # Export: exposed columns only (not 'cost'), every row, in key order.
    out = tmp_path / "out.csv"
    exported = dx("export", "products", "-o", str(out), "-c", str(cfg))
    assert exported.returncode == 0, exported.stderr
    with out.open(newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["sku", "name", "price", "qty"]
        body = list(reader)
    assert len(body) == count
    assert [r[0] for r in body] == sorted(expected)
    assert {r[0]: (r[1], Decimal(r[2]), int(r[3])) for r in body} == expected
    assert f"{count} rows written" in exported.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(
        dx("export", "products", "-c", str(cfg)).stdout.encode()).hexdigest()
