"""Messages Kafka deleted (retention) before a source route applied them: the worker stops and
names them instead of resuming silently at the log start; --accept-retention-gap goes on. A stored
offset beyond a re-created topic's end stops the same way; --accept-topic-reset applies it from
its start."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.integration.test_sink_support import wait_for
from tests.integration.test_source_support import (
    create_topic,
    produce,
    run_worker,
    stock_route,
    worker_process,
)


def applied_ten(stack: Any, pg_db: str, topic_prefix: str,
                tmp_path: Path) -> tuple[str, Path]:
    """A json route 'stock' into table stock that has applied offsets 0..9 of its topic."""
    topic, cfg = stock_route(stack, pg_db, topic_prefix, tmp_path, extra="    mode: upsert\n")
    produce(stack, topic, [({"sku": f"s{i}"}, {"sku": f"s{i}", "qty": i}) for i in range(10)])
    assert run_worker(cfg, "stock").applied == 10
    return topic, cfg


def source_run(cfg: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "source", "run", "stock",
                           "-c", str(cfg), "--stop-when-idle", "2", *extra],
                          capture_output=True, text=True, timeout=120)


def refused_with(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused run prints (exit code 1, nothing else on stderr)."""
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_deleted_messages_stop_the_worker_until_accepted(stack: Any, pg_db: str,
                                                         topic_prefix: str,
                                                         tmp_path: Path) -> None:
    topic, cfg = applied_ten(stack, pg_db, topic_prefix, tmp_path)
    produce(stack, topic, [({"sku": f"t{i}"}, {"sku": f"t{i}", "qty": i}) for i in range(10)])
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    for fut in admin.delete_records([TopicPartition(topic, 0, 15)]).values():
        fut.result(30)  # offsets 10..14 are gone before anyone applied them

    assert refused_with(source_run(cfg)) == (
        f"dx: error: {topic}[0]@10: route stock: messages 10..14 were deleted "
        "(retention) before being applied; restore them from their source, or "
        "accept the loss with 'dx source run stock --accept-retention-gap'")
    accepted = source_run(cfg, "--accept-retention-gap")
    assert accepted.returncode == 0, accepted.stderr
    with psycopg.connect(pg_db) as conn:
        skus = {r[0] for r in conn.execute("SELECT sku FROM stock").fetchall()}
    assert skus == {f"s{i}" for i in range(10)} | {f"t{i}" for i in range(5, 10)}


def recreate_topic(stack: Any, topic: str) -> None:
    """Delete ``topic`` and create it again, empty (deletion completes asynchronously)."""
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    for fut in admin.delete_topics([topic], operation_timeout=30).values():
        fut.result(30)
    deadline = time.monotonic() + 60
    while True:
        try:
            create_topic(stack, topic)
            return
        except KafkaException as err:  # still being deleted
            if err.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS or \
                    time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_stored_offset_beyond_a_recreated_topic_stops_until_accepted(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    topic, cfg = applied_ten(stack, pg_db, topic_prefix, tmp_path)
    recreate_topic(stack, topic)  # dx.source_offsets still says 10; the new partition ends at 7
    produce(stack, topic, [({"sku": f"n{i}"}, {"sku": f"n{i}", "qty": i}) for i in range(7)])

    assert refused_with(source_run(cfg)) == (
        f"dx: error: {topic}[0]@10: route stock: the stored offset 10 "
        "(dx.source_offsets) is beyond the partition's end 7: the topic was "
        "re-created or is another cluster's copy, and messages below the stored "
        "offset would be skipped; apply the partition from its start with "
        "'dx source run stock --accept-topic-reset'")
    accepted = source_run(cfg, "--accept-topic-reset")
    assert accepted.returncode == 0, accepted.stderr
    with psycopg.connect(pg_db) as conn:
        skus = {r[0] for r in conn.execute("SELECT sku FROM stock").fetchall()}
        stored = conn.execute("SELECT next_offset FROM dx.source_offsets").fetchall()
    assert skus == {f"s{i}" for i in range(10)} | {f"n{i}" for i in range(7)}
    assert stored == [(7,)]  # the next run needs no flag


def test_a_recreated_topic_that_grew_past_the_stored_offset_is_caught_by_its_id(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    topic, cfg = applied_ten(stack, pg_db, topic_prefix, tmp_path)
    recreate_topic(stack, topic)  # and it grows past the stored offset 10 before a restart
    produce(stack, topic, [({"sku": f"n{i}"}, {"sku": f"n{i}", "qty": i}) for i in range(15)])
    line = refused_with(source_run(cfg))
    assert line.startswith(f"dx: error: {topic}[0]@10: route stock: the stored offset 10 "
                           "(dx.source_offsets) belongs to another topic of this name (id "), line
    assert line.endswith("the topic was re-created or is another cluster's copy; apply the "
                         "partition from its start with 'dx source run stock "
                         "--accept-topic-reset'"), line
    accepted = source_run(cfg, "--accept-topic-reset")
    assert accepted.returncode == 0, accepted.stderr
    with psycopg.connect(pg_db) as conn:
        skus = {r[0] for r in conn.execute("SELECT sku FROM stock").fetchall()}
    assert skus == {f"s{i}" for i in range(10)} | {f"n{i}" for i in range(15)}


def test_a_topic_recreated_under_a_running_worker_stops_it(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    topic, cfg = applied_ten(stack, pg_db, topic_prefix, tmp_path)
    worker = worker_process(cfg, "stock", "--stop-when-idle", "60")
    try:
        produce(stack, topic, [({"sku": "s10"}, {"sku": "s10", "qty": 10})])
        wait_for(lambda: stock_count(pg_db) == 11, 60, what="the running worker")
        recreate_topic(stack, topic)
        produce(stack, topic, [({"sku": f"n{i}"}, {"sku": f"n{i}", "qty": i}) for i in range(7)])
        _, err = worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    errors = [ln for ln in err.splitlines() if ln.startswith("dx: error:")]
    assert worker.returncode == 1 and "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith(f"dx: error: {topic}[0]@11: route stock: the stored offset 11 "
                                "(dx.source_offsets) is beyond the partition's end 7"), errors
    assert stock_count(pg_db) == 11  # nothing of the new topic was applied or skipped silently


def stock_count(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM stock").fetchone()
    return int(row[0]) if row else 0
