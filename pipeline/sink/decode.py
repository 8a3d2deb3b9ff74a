"""Kafka message → :class:`~pipeline.sink.mapping.Event`.

Writer schemas are fetched from the registry by the id in the Confluent frame and cached for the
life of the worker. A message that cannot be decoded is *poison* (:class:`EventError` naming
topic, partition and offset: the task goes dead, the worker keeps going); a registry that cannot
be reached is :class:`ServiceUnavailable` (the worker waits and tries again: dead-lettering a good
event because the registry blinked would be wrong).
"""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import fastavro
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from pipeline.errors import EventError, ServiceUnavailable
from pipeline.events.avro import Converter, python_values
from pipeline.events.wire import decode_header
from pipeline.sink.mapping import Event


class Undecodable(Exception):
    """Raised inside the decoder; the caller adds topic/partition/offset."""


class Decoder:
    """Thread-safe Avro decoder for keys and values (lanes share one)."""

    def __init__(self, client: SchemaRegistryClient, url: str) -> None:
        self.client = client
        self.url = url
        self._schemas: dict[int, tuple[Any, Converter | None]] = {}
        self._lock = threading.Lock()

    def _schema(self, schema_id: int) -> Any:
        hit = self._schemas.get(schema_id)
        if hit is not None:
            return hit
        with self._lock:
            try:
                sch = self.client.get_schema(schema_id)
            except SchemaRegistryError as err:
                if err.http_status_code in (404, 422):
                    raise Undecodable(f"unknown schema id {schema_id} (not in the registry)"
                                      ) from None
                raise ServiceUnavailable("schema registry", self.url, str(err)) from None
            except Exception as err:  # connection errors from the registry client
                raise ServiceUnavailable("schema registry", self.url,
                                         f"{type(err).__name__}: {err}") from None
            try:
                raw = json.loads(sch.schema_str or "")
                parsed = (fastavro.parse_schema(raw), python_values(raw))
            except Exception as err:
                raise Undecodable(f"schema id {schema_id} is not an Avro schema: {err}") from None
            self._schemas[schema_id] = parsed
            return parsed

    def avro(self, data: bytes) -> Any:
        try:
            schema_id = decode_header(data)
        except ValueError as err:
            raise Undecodable(f"undecodable bytes: {err}") from None
        schema, to_python = self._schema(schema_id)
        try:
            datum = fastavro.schemaless_reader(io.BytesIO(data[5:]), schema, None)
            return datum if to_python is None else to_python(datum)
        except Exception as err:
            raise Undecodable(f"undecodable bytes: not Avro of schema id {schema_id} "
                              f"({type(err).__name__})") from None

    def key(self, data: bytes | None) -> dict[str, Any]:
        """The key as fields; a scalar key (outbox events) becomes ``{"key": value}``."""
        if data is None:
            return {}
        value = self.avro(data)
        return value if isinstance(value, dict) else {"key": value}

    def event(self, topic: str, partition: int, offset: int, key: dict[str, Any],
              value: bytes) -> Event:
        """Decode a change event; raises EventError (poison) or ServiceUnavailable."""
        try:
            decoded = self.avro(value)
        except Undecodable as err:
            raise EventError(str(err), topic=topic, partition=partition, offset=offset) from None
        if not isinstance(decoded, dict):
            raise EventError(f"value is a {type(decoded).__name__}, not a change event",
                             topic=topic, partition=partition, offset=offset)
        if "op" not in decoded and "aggregatetype" in decoded:
            decoded = _outbox_as_envelope(decoded, topic, partition, offset)
        if decoded.get("op") not in ("c", "u", "d", "r"):
            raise EventError(f"value has no Debezium op (got {decoded.get('op')!r})",
                             topic=topic, partition=partition, offset=offset)
        return Event(topic, partition, offset, key, decoded)


def _outbox_as_envelope(v: dict[str, Any], topic: str, partition: int,
                        offset: int) -> dict[str, Any]:
    """An application-written outbox event, seen by routes as a create of its JSON payload
    (plus ``aggregatetype``, ``aggregateid`` and ``type``), so filters and mappings apply."""
    try:
        payload = json.loads(v["payload"]) if v.get("payload") else {}
    except ValueError:
        raise EventError("outbox payload is not JSON", topic=topic, partition=partition,
                         offset=offset) from None
    after = payload if isinstance(payload, dict) else {"payload": payload}
    after = {**after, "aggregatetype": v.get("aggregatetype"),
             "aggregateid": v.get("aggregateid"), "type": v.get("type")}
    return {"op": "c", "before": None, "after": after, "event_id": v.get("event_id"),
            "origin": v.get("origin"), "ts_ms": v.get("ts_ms"),
            "source": {"table": v.get("aggregatetype"), "schema": "outbox",
                       "ts_ms": v.get("ts_ms")}}
