"""Messages Kafka deleted (retention) before a source route applied them: the worker stops and
names them instead of resuming silently at the log start; --accept-retention-gap goes on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from tests.integration.test_source_support import create_topic, produce, run_worker, write_config


def test_deleted_messages_stop_the_worker_until_accepted(stack: Any, pg_db: str,
                                                         topic_prefix: str,
                                                         tmp_path: Path) -> None:
    with psycopg.connect(pg_db) as conn:
        conn.execute("CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL)")
    topic = f"{topic_prefix}.stock"
    create_topic(stack, topic)
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, f"""  - name: stock
    topic: {topic}
    format: json
    table: stock
    mode: upsert
""")
    produce(stack, topic, [({"sku": f"s{i}"}, {"sku": f"s{i}", "qty": i}) for i in range(10)])
    assert run_worker(cfg, "stock").applied == 10
    produce(stack, topic, [({"sku": f"t{i}"}, {"sku": f"t{i}", "qty": i}) for i in range(10)])
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    for fut in admin.delete_records([TopicPartition(topic, 0, 15)]).values():
        fut.result(30)  # offsets 10..14 are gone before anyone applied them

    def source_run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "source", "run", "stock",
                               "-c", str(cfg), "--stop-when-idle", "2", *extra],
                              capture_output=True, text=True, timeout=120)

    refused = source_run()
    assert refused.returncode == 1, refused.stderr
    errors = [ln for ln in refused.stderr.splitlines() if ln.strip()]  # one line, nothing else
    assert errors == [f"dx: error: {topic}[0]@10: route stock: messages 10..14 were deleted "
                      "(retention) before being applied; restore them from their source, or "
                      "accept the loss with 'dx source run stock --accept-retention-gap'"]
    accepted = source_run("--accept-retention-gap")
    assert accepted.returncode == 0, accepted.stderr
    with psycopg.connect(pg_db) as conn:
        skus = {r[0] for r in conn.execute("SELECT sku FROM stock").fetchall()}
    assert skus == {f"s{i}" for i in range(10)} | {f"t{i}" for i in range(5, 10)}
