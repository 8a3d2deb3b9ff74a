"""The README's migration from dx's earlier Avro contracts (timestamptz as timestamp-micros,
unconstrained numeric as text) to Debezium's representations: refused in one line under the
registry's BACKWARD rule, then rolled out with the documented steps."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from confluent_kafka.schema_registry import Schema
from relay_support import TopicReader, dx, execute, relay_thread, write_config

from pipeline.events.wire import registry_client


def old_value_schema(ns: str) -> dict[str, Any]:
    """What dx registered for `items (id int, seen timestamptz, n numeric)` before."""
    value = {"type": "record", "name": "Value", "namespace": ns, "fields": [
        {"name": "id", "type": ["null", "int"], "default": None},
        {"name": "seen", "type": ["null", {"type": "long", "logicalType": "timestamp-micros"}],
         "default": None},
        {"name": "n", "type": ["null", {"type": "string", "connect.name": "dx.Numeric"}],
         "default": None}]}
    source = {"type": "record", "name": "Source", "namespace": "dx", "fields": [
        {"name": n, "type": "string"} for n in ("version", "connector", "name")] + [
        {"name": "ts_ms", "type": "long"},
        {"name": "snapshot", "type": ["null", "string"], "default": None}] + [
        {"name": n, "type": "string"} for n in ("db", "schema", "table")] + [
        {"name": "txId", "type": ["null", "long"], "default": None},
        {"name": "sequence", "type": ["null", "string"], "default": None}]}
    return {"type": "record", "name": "Envelope", "namespace": ns, "fields": [
        {"name": "before", "type": ["null", value], "default": None},
        {"name": "after", "type": ["null", f"{ns}.Value"], "default": None},
        {"name": "source", "type": source},
        {"name": "op", "type": "string"},
        {"name": "ts_ms", "type": ["null", "long"], "default": None},
        {"name": "event_id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "origin", "type": ["null", "string"], "default": None}]}


def set_compatibility(registry_url: str, subject: str, level: str) -> None:
    req = urllib.request.Request(
        f"{registry_url}/config/{subject}", method="PUT",
        data=json.dumps({"compatibility": level}).encode(),
        headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200


def test_incompatible_contract_change_is_refused_then_migrated(
        stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    execute(pg_db, "CREATE TABLE items (id int PRIMARY KEY, seen timestamptz, n numeric)")
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix,
                       "  - name: items\n    columns: [id, seen, n]\n")
    topic = f"{topic_prefix}.public.items"
    subject = f"{topic}-value"
    client = registry_client(stack.schema_registry_url)
    client.register_schema(subject, Schema(json.dumps(old_value_schema(topic)), "AVRO"))

    # an upgrade meets the old contract: one line naming the subject, nothing captured
    res = dx("capture", "install", "-c", str(cfg))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert subject in res.stderr and "not compatible" in res.stderr

    # the README's roll-out: generate, check, register under NONE, back to BACKWARD
    schemas = tmp_path / "avro_schemas"
    assert dx("schemas", "generate", "-c", str(cfg), "--dir", str(schemas)).returncode == 0
    check = dx("schemas", "check", "-c", str(cfg), "--dir", str(schemas))
    assert check.returncode == 1 and f"{subject}: NOT compatible" in check.stderr
    set_compatibility(stack.schema_registry_url, subject, "NONE")
    reg = dx("schemas", "register", "-c", str(cfg), "--dir", str(schemas))
    assert reg.returncode == 0, reg.stderr
    set_compatibility(stack.schema_registry_url, subject, "BACKWARD")

    assert dx("capture", "install", "-c", str(cfg)).returncode == 0
    execute(pg_db, "INSERT INTO items VALUES (1, '2026-11-29 10:00:00.25+01', 12.5)")
    reader = TopicReader(stack, topic)
    try:
        with relay_thread(cfg):
            events = reader.read(1, timeout_s=60)
    finally:
        reader.close()
    after = events[0].value["after"]  # type: ignore[index]
    assert after["seen"] == "2026-11-29T09:00:00.25Z"
    assert after["n"] == {"scale": 1, "value": (125).to_bytes(1, "big")}
