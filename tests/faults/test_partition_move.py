"""An UPDATE that moves a row to another partition reaches row triggers as DELETE + INSERT.
With the published key unchanged it is one update (a consumer must not see the entity deleted,
tombstoned and created again), or nothing when no exposed column changed; with the key changed
it stays a delete and a create."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.faults.oracle import wait_drained
from tests.integration.relay_support import TopicReader, dx, execute, relay_thread, write_config
from tests.integration.test_capture_partitions import ORDERS, outbox


def test_a_partition_move_with_the_same_key_is_an_update(stack: Any, pg_db: str,
                                                          topic_prefix: str,
                                                          tmp_path: Path) -> None:
    execute(pg_db, *ORDERS)
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: orders\n    columns: [id, region, v]\n    key: [id]\n")
    assert dx("capture", "install", "-c", str(cfg)).returncode == 0
    execute(pg_db, "INSERT INTO orders (id, region) VALUES (1, 'a'), (2, 'a'), (3, 'b')")
    execute(pg_db, "UPDATE orders SET region = 'b', v = 5 WHERE id IN (1, 2)")  # two moves
    execute(pg_db, "DELETE FROM orders_b1 WHERE id = 3",  # a delete and an insert of another
            "INSERT INTO orders (id, region) VALUES (4, 'a')")  # key in one transaction
    events = [(op, key["id"], (after or {}).get("region")) for op, key, after in
              outbox(pg_db, "public.orders")]
    assert events == [("c", 1, "a"), ("c", 2, "a"), ("c", 3, "b"), ("u", 1, "b"),
                      ("u", 2, "b"), ("d", 3, None), ("c", 4, "a")]

    reader = TopicReader(stack, f"{topic_prefix}.public.orders")
    with relay_thread(cfg):
        wait_drained(pg_db)
    got = reader.read(until=8, settle_s=0.5)
    reader.close()
    assert [(e.value["op"] if e.value else None, e.key["id"] if e.key else None)
            for e in got] == [("c", 1), ("c", 2), ("c", 3), ("u", 1), ("u", 2), ("d", 3),
                              (None, 3), ("c", 4)]


def test_a_partition_move_that_changes_no_exposed_column_emits_nothing(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    execute(pg_db, *ORDERS)
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: orders\n    columns: [id, v]\n    key: [id]\n")
    assert dx("capture", "install", "-c", str(cfg)).returncode == 0
    execute(pg_db, "INSERT INTO orders (id, region) VALUES (1, 'a')")
    execute(pg_db, "UPDATE orders SET region = 'b' WHERE id = 1")
    execute(pg_db, "UPDATE orders SET region = 'a', v = 2 WHERE id = 1")
    assert [(op, key["id"], (after or {}).get("v")) for op, key, after in
            outbox(pg_db, "public.orders")] == [("c", 1, 0), ("u", 1, 2)]
