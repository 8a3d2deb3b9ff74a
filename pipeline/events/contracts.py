"""``dx schemas generate|check|register``: the reviewed ``.avsc`` files in ``avro_schemas/``.

``generate`` writes what the live catalog and dx.yaml imply; ``check`` fails when the files
differ from that or when the registry would refuse them; ``register`` registers the files (not
the catalog) after a compatibility check, so what reaches the registry is what was reviewed.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.capture.spec import TableSpec
from pipeline.events import avro
from pipeline.events.wire import SchemaRegistrar


def render(schema: Any) -> str:
    return json.dumps(schema, indent=2) + "\n"


def expected_files(specs: list[TableSpec], prefix: str) -> dict[str, str]:
    files = {
        "dx.Source.avsc": render(avro.SOURCE_SCHEMA),
        "dx.OutboxEvent.avsc": render(avro.OUTBOX_EVENT_SCHEMA),
    }
    for spec in specs:
        files[f"{spec.topic}-key.avsc"] = render(avro.key_schema(spec, prefix))
        files[f"{spec.topic}-value.avsc"] = render(avro.value_schema(spec, prefix))
    return files


def generate(specs: list[TableSpec], prefix: str, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in expected_files(specs, prefix).items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written


@dataclass
class CheckResult:
    subject: str
    diff: str
    compatible: bool | None  # None: subject not registered yet


def check(specs: list[TableSpec], prefix: str, directory: Path,
          registrar: SchemaRegistrar | None) -> list[CheckResult]:
    from confluent_kafka.schema_registry import Schema
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    results = []
    for name, text in expected_files(specs, prefix).items():
        path = directory / name
        current = path.read_text() if path.exists() else ""
        diff = "".join(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                            str(path), "catalog"))
        compatible: bool | None = None
        subject = name.removesuffix(".avsc")
        if registrar is not None and not name.startswith("dx."):
            try:
                compatible = bool(registrar.client.test_compatibility(
                    subject, Schema(text, "AVRO")))
            except SchemaRegistryError as err:
                if err.http_status_code != 404:
                    raise
        results.append(CheckResult(subject, diff, compatible))
    return results


def require_compatible(spec: TableSpec, prefix: str, registrar: SchemaRegistrar) -> None:
    """Refuse (SchemaError) a capture spec whose key or value schema the registered subject
    cannot evolve into, *before* the triggers write events the relay could not publish."""
    from confluent_kafka.schema_registry import Schema

    for subject, schema in ((f"{spec.topic}-key", avro.key_schema(spec, prefix)),
                            (f"{spec.topic}-value", avro.value_schema(spec, prefix))):
        registrar.check_compatible(subject, Schema(render(schema), "AVRO"))


def register(directory: Path, registrar: SchemaRegistrar) -> list[tuple[str, int]]:
    out = []
    for path in sorted(directory.glob("*.avsc")):
        if path.name.startswith("dx."):
            continue  # named types embedded in the per-topic schemas, not subjects of their own
        reg = registrar.get(path.name.removesuffix(".avsc"), path.read_text())
        out.append((reg.subject, reg.schema_id))
    return out
