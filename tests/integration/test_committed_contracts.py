"""The committed contracts in ``avro_schemas/`` are what dx really does with the demo shop.

They were generated with ``dx schemas generate`` from deploy/demo/shop.sql and the demo's
dx.yaml under the topic prefix ``shop``. Two checks keep them honest:

* ``dx schemas check`` against a fresh demo database finds them up to date (the catalog and the
  Avro mapping still produce exactly these files);
* a relay running the demo's tables (under this test's own prefix, so nothing is shared with
  other runs) registers exactly these schemas: the key and envelope of every table, the ``Source``
  block inside each envelope, and the outbox event shape for ``dx.publish()``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import fastavro
from confluent_kafka.schema_registry.error import SchemaRegistryError
from relay_support import dx, execute, load_demo_shop, relay_thread, render_demo_config

from pipeline.events.wire import registry_client

CONTRACTS = Path(__file__).resolve().parents[2] / "avro_schemas"
CONTRACT_PREFIX = "shop"
TABLES = ("products", "prices", "stock", "orders", "order_lines")


def demo_config(path: Path, stack: Any, db_url: str, prefix: str) -> Path:
    return render_demo_config(path, {
        "DX_DEMO_DATABASE_URL": db_url, "DX_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "DX_SCHEMA_REGISTRY_URL": stack.schema_registry_url, "DX_DEMO_PREFIX": prefix,
        "DX_PIM_URL": "http://127.0.0.1:9", "DX_PIM_TOKEN": "unused"})


def resolved(schema: Any) -> Any:
    """The schema with every name written in full: the registry stores the same schema with
    names relative to their enclosing namespace, which is the same Avro schema."""
    return fastavro.parse_schema(schema)


def contract(name: str, prefix: str) -> Any:
    """A committed schema with its namespace moved from ``shop`` to ``prefix``."""
    text = (CONTRACTS / f"{name}.avsc").read_text()
    return resolved(json.loads(text.replace(f'"{CONTRACT_PREFIX}.public.',
                                            f'"{prefix}.public.')))


def test_committed_contracts_match_the_catalog_and_the_relay(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    load_demo_shop(pg_db)

    # dx schemas check: the files are what the catalog implies today
    shop = demo_config(tmp_path / "shop.yaml", stack, pg_db, CONTRACT_PREFIX)
    check = dx("schemas", "check", "-c", str(shop), "--dir", str(CONTRACTS), "--offline")
    assert check.returncode == 0, check.stdout + check.stderr
    lines = check.stdout.splitlines()
    assert len(lines) == 2 + 2 * len(TABLES), check.stdout
    assert all("up to date" in line for line in lines), check.stdout

    # the relay registers exactly the committed shapes
    cfg = demo_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix)
    for step in (("init",), ("capture", "install")):
        res = dx(*step, "-c", str(cfg))
        assert res.returncode == 0, res.stderr
    execute(pg_db,
            "UPDATE products SET name = name || '!' WHERE id = 1",
            "UPDATE prices SET amount = amount + 1 WHERE product_id = 1",
            "UPDATE stock SET quantity = quantity + 1 WHERE product_id = 1",
            "UPDATE orders SET status = 'paid' WHERE id = 1",
            "UPDATE order_lines SET quantity = quantity + 1 WHERE order_id = 1 AND line_no = 1",
            "SELECT dx.publish('order', '1', 'OrderPaid', '{\"id\": 1}'::jsonb)")
    client = registry_client(stack.schema_registry_url)
    subjects = {f"{topic_prefix}.public.{t}-{part}": f"{CONTRACT_PREFIX}.public.{t}-{part}"
                for t in TABLES for part in ("key", "value")}
    outbox = f"{topic_prefix}.outbox.order-value"
    wanted = {*subjects, outbox}
    schemas: dict[str, Any] = {}

    def registered(subject: str) -> Any:
        if subject not in schemas:
            try:
                text = client.get_latest_version(subject).schema.schema_str
            except SchemaRegistryError as err:
                if err.http_status_code != 404:
                    raise
                return None
            schemas[subject] = resolved(json.loads(text))
        return schemas[subject]

    with relay_thread(cfg):
        deadline = time.monotonic() + 90
        while missing := [s for s in sorted(wanted) if registered(s) is None]:
            assert time.monotonic() < deadline, f"not registered: {missing}"
            time.sleep(0.5)

    for subject, name in subjects.items():
        assert registered(subject) == contract(name, topic_prefix), subject
    source = {f["name"]: f["type"] for f in registered(f"{topic_prefix}.public.products-value")
              ["fields"]}["source"]
    assert resolved(source) == contract("dx.Source", topic_prefix)
    assert registered(outbox) == contract("dx.OutboxEvent", topic_prefix)
