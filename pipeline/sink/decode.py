"""Kafka message → :class:`~pipeline.sink.mapping.Event`.

Bytes go through the one wire decoder (:class:`~pipeline.events.wire.WireDecoder`). A message
that cannot be decoded is *poison* (:class:`EventError` naming topic, partition and offset: the
task goes dead, the worker keeps going); a registry that cannot be reached is
:class:`ServiceUnavailable` (the worker waits and tries again).
"""

from __future__ import annotations

import json
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient

from pipeline.errors import EventError
from pipeline.events.wire import Undecodable, WireDecoder
from pipeline.sink.mapping import Event

__all__ = ["Decoder", "Undecodable"]


class Decoder:
    """Thread-safe Avro decoder for keys and values (lanes share one)."""

    def __init__(self, client: SchemaRegistryClient, url: str) -> None:
        self.wire = WireDecoder(client, url)

    def avro(self, data: bytes) -> Any:
        return self.wire.decode(data)

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
