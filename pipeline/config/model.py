"""The typed model of ``dx.yaml``.

Every model forbids unknown keys (a typo must not silently become a default) and is frozen, so a
running worker cannot drift from the file it loaded. Secrets are :class:`SecretStr` and only ever
come from ``${VAR}`` interpolation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from pipeline.config.alerts import AlertsConfig
from pipeline.config.api import ApiConfig
from pipeline.config.names import TOPIC, TableRef, check_topic
from pipeline.config.sinks import SinkRoute
from pipeline.config.sources import SourceRoute
from pipeline.errors import ConfigError

Route = TypeVar("Route", SinkRoute, SourceRoute)



class Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseConfig(Base):
    """The shop's PostgreSQL database (dx keeps its own tables in schema ``dx`` there)."""

    url: SecretStr = Field(description="PostgreSQL URL, e.g. ${DX_DATABASE_URL}")
    connect_timeout_s: float = Field(5.0, gt=0, description="seconds to wait for a connection")


class NewTopicsConfig(Base):
    """How dx creates the topics it writes to when they do not exist (it never relies on
    broker auto-create, which production clusters usually turn off)."""

    partitions: int = Field(1, ge=1, le=10_000, description="partitions of a topic dx creates")
    replication_factor: int | None = Field(
        None, ge=1, le=32, description="replicas of a topic dx creates; default the broker's "
        "default.replication.factor")
    config: dict[str, str | int] = Field(
        default_factory=dict, description="topic settings of a topic dx creates, e.g. "
        "min.insync.replicas: 2")


class KafkaConfig(Base):
    """The Kafka cluster the exchange runs on."""

    bootstrap_servers: str = Field(description="host:port list, e.g. ${DX_KAFKA_BOOTSTRAP}")
    topic_prefix: str = Field("dx", description="prefix of default topic names")
    client: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="extra librdkafka properties (security.protocol, sasl.*); unknown ones fail",
    )
    new_topics: NewTopicsConfig = Field(
        default_factory=NewTopicsConfig, description="how dx creates topics it needs"
    )

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not TOPIC.match(v):
            raise ValueError("only letters, digits, '.', '_' and '-' are allowed")
        return v

    def librdkafka(self, role: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The properties of a librdkafka client (producer, consumer or admin): the cluster,
        then ``client`` (security, tuning), then what the client's ``role`` needs, which wins
        (an idempotent producer stays idempotent whatever ``client`` says)."""
        return {"bootstrap.servers": self.bootstrap_servers, **self.client, **(role or {})}


class SchemaRegistryConfig(Base):
    """A Confluent-compatible schema registry (Apicurio: ``.../apis/ccompat/v7``)."""

    url: str = Field(description="registry URL, e.g. ${DX_SCHEMA_REGISTRY_URL}")
    basic_auth_user_info: SecretStr | None = Field(None, description="user:password, from ${VAR}")


class RelayConfig(Base):
    """How the relay moves the outbox to Kafka."""

    name: str = Field("default", description="relay identity: lease, state key, transactional.id")
    mode: Literal["exactly-once", "at-least-once"] = Field(
        "exactly-once",
        description="exactly-once commits the cursor inside the Kafka transaction",
    )
    batch_size: int = Field(2000, ge=1, le=100_000, description="outbox rows per batch")
    poll_interval_s: float = Field(0.05, gt=0, le=60, description="poll period; NOTIFY wakes early")
    state_topic: str | None = Field(None, description="compacted cursor topic (exactly-once)")
    auto_register_schemas: bool = Field(
        True, description="register compatible schema changes without stopping"
    )
    standby_poll_s: float = Field(1.0, gt=0, description="how often a standby tries the lease")
    lease_timeout_s: float = Field(
        30.0, ge=1, le=3600,
        description="a standby takes over from an active relay that has not renewed its lease "
                    "this long (frozen, cut off); the active one stops itself at 60% of it")


class TableConfig(Base, TableRef):
    """One exchanged table. Only ``columns`` ever leave the database."""

    table_ref: ClassVar[str] = "name"

    name: str = Field(description="table, optionally schema-qualified (default schema public)")
    columns: list[str] = Field(min_length=1, description="exposed columns (allow-list)")
    key: list[str] | None = Field(None, description="key columns; default the primary key")
    topic: str | None = Field(None, description="default <topic_prefix>.<schema>.<table>")
    capture: Literal["row", "statement"] | None = Field(
        None, description="trigger kind in trigger mode; default capture.trigger"
    )

    @field_validator("columns", "key")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("column names must be unique")
        return v

    _topic = field_validator("topic")(classmethod(lambda cls, v: check_topic(v)))


class CaptureConfig(Base):
    """Defaults for change capture."""

    mode: Literal["auto", "logical", "trigger"] = Field(
        "auto",
        description="logical: read the WAL through a replication slot (no trigger on the write "
        "path); trigger: capture triggers and the dx.outbox table; auto: logical where "
        "wal_level=logical and the role may replicate, else trigger (the earlier values row "
        "and statement still mean trigger mode of that kind)",
    )
    trigger: Literal["row", "statement"] = Field(
        "row", description="trigger mode's kind: row triggers, or statement triggers with "
        "transition tables (bulk)"
    )
    notify: bool = Field(True, description="NOTIFY the relay on commit (a wake-up hint only)")

    @model_validator(mode="before")
    @classmethod
    def _legacy_mode(cls, data: Any) -> Any:
        """``mode: row|statement`` (before logical capture existed) means trigger mode of
        that kind, so existing files keep capturing exactly as they did."""
        if isinstance(data, dict) and data.get("mode") in ("row", "statement"):
            if "trigger" in data:
                raise ValueError("capture.mode row/statement is the old spelling of "
                                 "capture.trigger; set only 'trigger' (and 'mode: trigger')")
            data = {**data, "trigger": data["mode"], "mode": "trigger"}
        return data


class OutboxConfig(Base):
    """Application-written events (Debezium outbox shape)."""

    topic_template: str = Field(
        "{prefix}.outbox.{aggregatetype}", description="topic per aggregatetype"
    )


class DxConfig(Base):
    """The whole ``dx.yaml``."""

    database: DatabaseConfig = Field(description="the shop database")
    kafka: KafkaConfig = Field(description="the Kafka cluster")
    schema_registry: SchemaRegistryConfig = Field(description="the schema registry")
    relay: RelayConfig = Field(default_factory=RelayConfig,
                               description="outbox to Kafka")
    capture: CaptureConfig = Field(default_factory=CaptureConfig,
                                   description="capture defaults")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig,
                                 description="application events")
    tables: list[TableConfig] = Field(default_factory=list, description="exchanged tables")
    sinks: list[SinkRoute] = Field(default_factory=list,
                                   description="outbound routes to third-party systems")
    sources: list[SourceRoute] = Field(default_factory=list,
                                       description="inbound routes applied to the database")
    alerts: AlertsConfig = Field(default_factory=AlertsConfig,
                                 description="alert channels and rules ('dx alerts run')")
    api: ApiConfig = Field(default_factory=ApiConfig, description="the Data Exchange API")

    _file: str = PrivateAttr("dx.yaml")
    _lines: dict[tuple[str | int, ...], int] = PrivateAttr(default_factory=dict)

    def attach_source(self, file: str, lines: dict[tuple[str | int, ...], int]) -> None:
        self._file = file
        self._lines = lines

    def where(self, *loc: str | int) -> tuple[str, int | None]:
        """File and line of a key path, for errors found after parsing (catalog checks)."""
        for n in range(len(loc), -1, -1):
            if loc[:n] in self._lines:
                return self._file, self._lines[loc[:n]]
        return self._file, None

    def sink(self, name: str) -> tuple[int, SinkRoute]:
        """The sink route called ``name`` and its index (for ``where("sinks", index, ...)``);
        ConfigError naming the configured routes otherwise."""
        return self._route("sinks", self.sinks, name)

    def source(self, name: str) -> tuple[int, SourceRoute]:
        """The source route called ``name`` and its index; ConfigError otherwise."""
        return self._route("sources", self.sources, name)

    def _route(self, key: str, routes: Sequence[Route], name: str) -> tuple[int, Route]:
        for i, route in enumerate(routes):
            if route.name == name:
                return i, route
        known = ", ".join(r.name for r in routes) or "none"
        file, line = self.where(key)
        raise ConfigError(f"no {key[:-1]} route named {name!r} (configured: {known})",
                          file=file, line=line)

    def topic_for(self, table: TableConfig) -> str:
        return table.topic or f"{self.kafka.topic_prefix}.{table.schema_name}.{table.table_name}"

    def table(self, name: str) -> TableConfig:
        wanted = name if "." in name else f"public.{name}"
        for t in self.tables:
            if t.qualified == wanted:
                return t
        known = ", ".join(t.qualified for t in self.tables) or "none"
        raise KeyError(f"table {name!r} is not configured (configured: {known})")

    @property
    def state_topic(self) -> str:
        return self.relay.state_topic or f"{self.kafka.topic_prefix}.dx-relay-state"


def model_at(loc: tuple[str | int, ...], data: Any) -> type[BaseModel] | None:
    """The model class that validates the mapping at ``loc`` (for 'allowed keys' hints)."""
    model: type[BaseModel] = DxConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)),
                   None)
        if nxt is None:
            for c in candidates:
                for a in getattr(c, "__args__", ()):
                    if isinstance(a, type) and issubclass(a, BaseModel):
                        nxt = a
        if nxt is None:
            return None
        model = nxt
    return model
