"""Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro binary body.

We register a schema once per (subject, schema) and encode with fastavro's schemaless writer
directly; confluent_kafka's ``AvroDeserializer`` (or any Confluent-compatible consumer) reads the
result. Keeping the id in hand avoids a registry look-up per serializer instance when the relay
switches schema versions live.
"""

from __future__ import annotations

import io
import json
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import fastavro
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from pipeline.config.model import SchemaRegistryConfig
from pipeline.errors import SchemaError, ServiceUnavailable
from pipeline.events.avro import Converter, python_values
from pipeline.observability.logging import redact

MAGIC = 0


@dataclass
class RegisteredSchema:
    subject: str
    schema_id: int
    parsed: Any
    header: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.header = struct.pack(">bI", MAGIC, self.schema_id)

    def encode(self, value: Any) -> bytes:
        buf = io.BytesIO()
        buf.write(self.header)
        fastavro.schemaless_writer(buf, self.parsed, value)
        return buf.getvalue()


def decode_header(data: bytes) -> int:
    """Schema id of a Confluent-framed message; raises ValueError when the frame is wrong."""
    if len(data) < 5 or data[0] != MAGIC:
        raise ValueError("not Confluent wire format (magic byte 0 + 4-byte schema id)")
    return int(struct.unpack(">I", data[1:5])[0])


class Undecodable(ValueError):
    """Bytes that are not a decodable Confluent-framed Avro message (poison: the caller names
    topic, partition and offset, and dead-letters it)."""


class WireDecoder:
    """The one Confluent wire-format Avro decoder (sink and source workers): writer schemas are
    looked up by the id in the frame and cached for the life of the worker. Thread-safe.

    A message that cannot be decoded raises :class:`Undecodable`; a registry that cannot be
    reached raises :class:`~pipeline.errors.ServiceUnavailable` (wait and retry: dead-lettering
    a good event because the registry blinked would be wrong)."""

    def __init__(self, client: SchemaRegistryClient, url: str) -> None:
        self.client = client
        self.url = url
        self._schemas: dict[int, tuple[Any, Converter | None]] = {}
        self._lock = threading.Lock()

    def _schema(self, schema_id: int) -> tuple[Any, Converter | None]:
        hit = self._schemas.get(schema_id)
        if hit is not None:
            return hit
        with self._lock:
            try:
                sch = self.client.get_schema(schema_id)
            except SchemaRegistryError as err:
                if err.http_status_code in (404, 422):
                    raise Undecodable(f"schema id {schema_id} is not in the registry") from None
                raise ServiceUnavailable("schema registry", self.url, str(err)) from None
            except Exception as err:  # connection errors from the registry client
                raise ServiceUnavailable("schema registry", self.url,
                                         f"{type(err).__name__}: {err}") from None
            try:
                raw = json.loads(sch.schema_str or "")
                # Debezium's representations (timestamptz, unconstrained numeric, interval) are
                # turned back into Python values here, so every reader sees the same values.
                parsed = (fastavro.parse_schema(raw), python_values(raw))
            except Exception as err:
                raise Undecodable(f"schema id {schema_id} is not an Avro schema: {err}"
                                  ) from None
            self._schemas[schema_id] = parsed
            return parsed

    def decode(self, data: bytes) -> Any:
        try:
            schema_id = decode_header(data)
        except ValueError as err:
            raise Undecodable(f"undecodable: {err}") from None
        schema, to_python = self._schema(schema_id)
        try:
            datum = fastavro.schemaless_reader(io.BytesIO(data[5:]), schema, None)
            return datum if to_python is None else to_python(datum)
        except Exception as err:
            raise Undecodable(f"undecodable: not Avro of schema id {schema_id} "
                              f"({type(err).__name__}: {err})") from None


#: seconds one registry request may take; without a bound a half-open connection to the
#: registry hangs the caller forever, with no retry and no heartbeat. Short enough that one
#: request (the registry client retries none itself, see :func:`registry_client`) blocks a
#: worker for well under a liveness probe's heartbeat timeout.
REGISTRY_TIMEOUT_S = 5


def registry_client(registry: SchemaRegistryConfig | str) -> SchemaRegistryClient:
    """The one way dx builds a registry client: from ``schema_registry:`` in dx.yaml (its
    credentials unwrapped here and nowhere else), or from a bare URL.

    ``max.retries`` is 0: the client's own retries sleep and retry inside one call (4 x the
    timeout against a black-holed registry), where no heartbeat is sent. A failed request
    raises at once and the caller's retry loop (relay batch retries, the sink lanes' and
    worker's registry waits, the source worker's batch retries) waits with its heartbeat going."""
    conf: dict[str, Any] = {"timeout": REGISTRY_TIMEOUT_S, "max.retries": 0}
    if isinstance(registry, str):
        return SchemaRegistryClient({"url": registry, **conf})
    conf["url"] = registry.url
    if registry.basic_auth_user_info is not None:
        conf["basic.auth.user.info"] = registry.basic_auth_user_info.get_secret_value()
    return SchemaRegistryClient(conf)


class SchemaRegistrar:
    """Registers schemas after a compatibility check and caches their ids."""

    def __init__(self, client: SchemaRegistryClient, url: str, *, auto_register: bool = True):
        self.client = client
        self.url = redact(url)  # for messages only: never a password in an error line
        self.auto_register = auto_register
        self._cache: dict[tuple[str, str], RegisteredSchema] = {}

    def get(self, subject: str, schema: dict[str, Any] | str) -> RegisteredSchema:
        text = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)
        hit = self._cache.get((subject, text))
        if hit is not None:
            return hit
        parsed = fastavro.parse_schema(json.loads(text))
        sch = Schema(text, "AVRO")
        schema_id: int | None
        try:
            if self.auto_register:
                self.check_compatible(subject, sch)
                schema_id = self.client.register_schema(subject, sch)
            else:
                schema_id = self.client.lookup_schema(subject, sch).schema_id
        except SchemaRegistryError as err:
            if err.http_status_code in (None, 500, 502, 503, 504):
                raise ServiceUnavailable("schema registry", self.url, str(err)) from None
            raise SchemaError(f"registry refused schema for subject {subject}: "
                              f"{err.error_message} (HTTP {err.http_status_code})") from None
        except SchemaError:
            raise
        except Exception as err:  # requests/httpx connection errors
            raise ServiceUnavailable("schema registry", self.url,
                                     f"{type(err).__name__}: {err}") from None
        if schema_id is None:
            raise SchemaError(f"registry returned no schema id for subject {subject}")
        reg = RegisteredSchema(subject, int(schema_id), parsed)
        self._cache[(subject, text)] = reg
        return reg

    def check_reachable(self) -> None:
        """Fail fast with one line when the registry does not answer at start-up."""
        try:
            self.client.get_subjects()
        except SchemaRegistryError as err:
            if err.http_status_code in (None, 500, 502, 503, 504):
                raise ServiceUnavailable("schema registry", self.url, str(err)) from None
        except Exception as err:
            raise ServiceUnavailable("schema registry", self.url,
                                     f"{type(err).__name__}: {err}") from None

    def check_compatible(self, subject: str, schema: Schema) -> None:
        """Refuse a schema the subject's latest version cannot evolve into."""
        try:
            ok = self.client.test_compatibility(subject, schema)
        except SchemaRegistryError as err:
            if err.http_status_code == 404:  # no such subject yet: anything goes
                return
            raise
        if not ok:
            raise SchemaError(
                f"schema for subject {subject} is not compatible with the registered one; "
                "run 'dx schemas check' to see the difference"
            )
