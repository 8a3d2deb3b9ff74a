"""Sink routes: topics → filter → map → connector.

A route is declared in ``dx.yaml`` under ``sinks:``. Everything here is validated when the file is
loaded, so a worker never discovers a typo in a template or a mapping at the first event:

* ``filter`` is declarative (ops, simple comparisons on the row, origins) — no expressions, so it
  cannot fail at run time except on a value of an unexpected type (then the event is dead-lettered
  with the reason).
* ``mapping`` is a deliberately small language, documented in ``connectors/README.md``:
  ``select`` copies columns, ``fields`` maps a target path (dots build nested objects) to a source
  path, a constant or a template, with an optional type conversion and default.
* ``connector`` is validated by the connector's own pydantic model (looked up by ``type`` in the
  connector registry), so its errors carry file and line like every other key.

Source paths and ``{path}`` templates are the language of :mod:`pipeline.templates`.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from pipeline.config.connectors import ConnectorSettings, settings_model
from pipeline.config.names import TOPIC, check_topic
from pipeline.templates import IDENT, check_path, template_paths

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,119}$")
_TARGET = re.compile(rf"^{IDENT}(?:\.{IDENT})*$")

Op = Literal["c", "u", "d", "r"]
ValueType = Literal["string", "int", "float", "decimal", "bool", "date", "datetime",
                    "epoch_ms", "json"]


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Condition(_Base):
    """One comparison in ``filter.where``; all conditions of a route must hold (AND).

    Exactly one operator per condition. Comparisons against a null value are false except
    ``eq: null``/``ne: null``/``exists``. ``changed: true`` holds when ``before`` and ``after``
    differ in this column (always true for inserts and deletes).
    """

    field: str = Field(description="source path, e.g. status or $before.status")
    eq: Any = None
    ne: Any = None
    gt: float | str | None = None
    ge: float | str | None = None
    lt: float | str | None = None
    le: float | str | None = None
    in_: list[Any] | None = Field(None, alias="in")
    not_in: list[Any] | None = None
    exists: bool | None = None
    changed: bool | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    _field = field_validator("field")(classmethod(lambda cls, v: check_path(v)))

    @model_validator(mode="before")
    @classmethod
    def _one_operator(cls, data: Any) -> Any:
        if isinstance(data, dict):
            ops = [k for k in data if k != "field"]
            if len(ops) != 1:
                raise ValueError(
                    "a condition needs 'field' and exactly one operator of eq, ne, gt, ge, lt, "
                    f"le, in, not_in, exists, changed (got {', '.join(ops) or 'none'})"
                )
        return data

    @property
    def operator(self) -> str:
        for name in ("eq", "ne", "gt", "ge", "lt", "le", "not_in", "exists", "changed"):
            if name in self.model_fields_set:
                return name
        return "in"

    @property
    def operand(self) -> Any:
        op = self.operator
        return self.in_ if op == "in" else getattr(self, op)


class FilterConfig(_Base):
    """Which events the route delivers; the others become ``skipped`` tasks with the reason."""

    ops: list[Op] | None = Field(None, description="operations to deliver; default all")
    where: list[Condition] = Field(default_factory=list, description="all must hold")
    origins: list[str] | None = Field(
        None, description="deliver only events caused by these systems (null origin = 'db')"
    )
    exclude_origins: list[str] = Field(
        default_factory=list, description="never deliver events caused by these systems"
    )


class FieldMap(_Base):
    """How one target field is produced: exactly one of ``from``, ``const``, ``template``."""

    from_: str | None = Field(None, alias="from", description="source path")
    const: Any = Field(None, description="a constant value")
    template: str | None = Field(None, description="text with {path} placeholders")
    type: ValueType | None = Field(None, description="convert the value to this type")
    default: Any = Field(None, description="value used when the source is null or missing")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):  # `target: source_path`
            return {"from": data}
        if isinstance(data, dict):
            given = [k for k in ("from", "from_", "const", "template") if k in data]
            if len(given) != 1:
                raise ValueError("give exactly one of 'from', 'const' or 'template' "
                                 f"(got {', '.join(given) or 'none'})")
        return data

    @field_validator("from_")
    @classmethod
    def _from(cls, v: str | None) -> str | None:
        return None if v is None else check_path(v)

    @field_validator("template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            template_paths(v)
        return v


class MappingConfig(_Base):
    """The payload sent to the target. Without ``select`` and ``fields`` the whole current row
    is sent unchanged (values converted to JSON-friendly forms)."""

    select: list[str] | None = Field(None, description="columns copied under their own name")
    fields: dict[str, FieldMap] = Field(
        default_factory=dict, description="target path (dots nest objects) -> how to produce it"
    )
    drop_nulls: bool = Field(False, description="omit fields whose value is null")

    @field_validator("select")
    @classmethod
    def _select(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            for name in v:
                check_path(name)
            if len(set(v)) != len(v):
                raise ValueError("selected columns must be unique")
        return v

    @field_validator("fields")
    @classmethod
    def _targets(cls, v: dict[str, FieldMap]) -> dict[str, FieldMap]:
        for target in v:
            if not _TARGET.match(target):
                raise ValueError(f"{target!r} is not a target path (names joined by dots)")
        names = sorted(v)
        for a, b in itertools.pairwise(names):
            if b.startswith(a + "."):
                raise ValueError(f"target {a!r} is both a value and the object holding {b!r}")
        return v

    @model_validator(mode="after")
    def _no_clash(self) -> MappingConfig:
        for name in self.select or []:
            target = name.rsplit(".", 1)[-1]
            if target in self.fields:
                raise ValueError(f"{target!r} is both selected and mapped in 'fields'")
        return self


class RetryPolicy(_Base):
    """Exponential backoff with jitter for transient failures.

    Attempt ``n`` (1-based) that fails transiently waits ``min(max_s, base_s * 2**(n-1))``,
    scaled by a random factor in ``[1 - jitter, 1]``; a target's ``Retry-After`` wins when larger.
    After ``max_attempts`` the task is ``dead``. Throttling (HTTP 429) does not use up attempts:
    it is back-pressure, not failure.
    """

    max_attempts: int = Field(8, ge=1, le=1000, description="attempts before the task is dead")
    backoff_base_s: float = Field(0.5, gt=0, le=3600)
    backoff_max_s: float = Field(60.0, gt=0, le=86_400)
    jitter: float = Field(0.5, ge=0, le=1, description="fraction of the delay randomised away")

    def delay(self, attempt: int, rnd: float) -> float:
        """Seconds to wait after failed attempt ``attempt``; ``rnd`` is uniform in [0, 1)."""
        raw = min(self.backoff_max_s, self.backoff_base_s * (2 ** max(0, attempt - 1)))
        return float(raw * (1 - self.jitter * rnd))


class BreakerPolicy(_Base):
    """The route's circuit breaker: when the target keeps failing transiently (connection
    refused, timeouts, 5xx, repeated 429), the route pauses instead of burning retries.

    After ``failures`` transient failures in a row the breaker opens: no new attempts, and
    failures while it is open do not use up attempts (no task goes dead because the target is
    down). It probes with one request after ``probe_initial_s``, doubling up to ``probe_max_s``,
    and closes by itself when a probe is answered. Terminal errors (the target answered and
    refused) count as answers.
    """

    enabled: bool = Field(True, description="pause the route while its target is down")
    failures: int = Field(5, ge=1, le=10_000,
                          description="transient failures in a row that open the breaker")
    probe_initial_s: float = Field(1.0, gt=0, le=3600, description="first probe after this")
    probe_max_s: float = Field(60.0, gt=0, le=86_400, description="longest wait between probes")


class DeadLetterConfig(_Base):
    """Where dead tasks are produced (the original key and value, the error in headers)."""

    topic: str | None = Field(None, description="default: <source topic>.dlq")

    _topic = field_validator("topic")(classmethod(lambda cls, v: check_topic(v)))


class TaskLogConfig(_Base):
    """How much the task store keeps per task.

    ``full``: received and mapped payload, request and response for every task. ``errors``
    (default): those logs only for tasks that did not succeed; succeeded tasks keep their status,
    key and offsets. ``minimal``: no payload logs, only status and the error reason.
    """

    detail: Literal["full", "errors", "minimal"] = "errors"
    max_bytes: int = Field(4096, ge=64, le=1_048_576, description="truncate each log entry")
    record_skipped: bool = Field(True, description="record filtered-out events as skipped tasks")
    retention_days: float = Field(
        7, gt=0, description="succeeded and skipped tasks older than this are purged"
    )


class SinkRoute(_Base):
    """One route: consume ``topics``, filter, map, deliver through ``connector``."""

    name: str = Field(description="route name (dx sink run NAME); letters, digits, . _ -")
    topics: list[str] = Field(min_length=1, description="source topics")
    target: str | None = Field(
        None, description="system name of the target; events whose origin equals it are skipped"
    )
    group_id: str | None = Field(None, description="consumer group; default dx-sink-<name>")
    filter: FilterConfig = Field(default_factory=FilterConfig)
    mapping: MappingConfig = Field(default_factory=MappingConfig)
    connector: ConnectorSettings = Field(description="connector settings; 'type' picks it")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    concurrency: int = Field(4, ge=1, le=256, description="worker lanes; a key stays in one")
    batch_size: int = Field(100, ge=1, le=10_000, description="max events per delivery call")
    breaker: BreakerPolicy = Field(default_factory=BreakerPolicy)
    max_unfinished: int = Field(
        10_000, ge=10, le=1_000_000,
        description="events of one partition held in memory unfinished (queued, waiting for a "
        "retry or for an earlier event of their key); at the bound the partition pauses until "
        "half are done (checked after each fetch of up to 500 events)")
    dead_letter: DeadLetterConfig = Field(default_factory=DeadLetterConfig)
    log: TaskLogConfig = Field(default_factory=TaskLogConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use letters, digits, '.', '_' and '-' (at most 120)")
        return v

    @field_validator("topics")
    @classmethod
    def _topics(cls, v: list[str]) -> list[str]:
        for t in v:
            if not TOPIC.match(t):
                raise ValueError(f"{t!r} is not a valid Kafka topic name")
        if len(set(v)) != len(v):
            raise ValueError("topics must be unique")
        return v

    @field_validator("connector", mode="before")
    @classmethod
    def _connector(cls, v: Any) -> Any:
        """Validate with the connector's own model; errors keep the nested key path."""
        if not isinstance(v, dict):
            raise ValueError("must be a mapping with 'type' and the connector's settings")
        kind = v.get("type")
        if not isinstance(kind, str):
            raise ValueError("'type' is required (the connector name, e.g. http)")
        try:
            model = settings_model(kind)
        except KeyError as err:
            raise PydanticCustomError("connector_unknown", str(err.args[0])) from None
        try:
            return model.model_validate(v)
        except ValidationError as err:
            raise _with_allowed_keys(err, model) from None

    def dead_letter_topic(self, source_topic: str) -> str:
        return self.dead_letter.topic or f"{source_topic}.dlq"

    @property
    def consumer_group(self) -> str:
        return self.group_id or f"dx-sink-{self.name}"


def _with_allowed_keys(err: ValidationError, model: type[BaseModel]) -> ValidationError:
    """Rewrite 'extra forbidden' errors of a connector model to list the allowed keys (the
    loader can only list keys of models it knows statically)."""
    details: list[InitErrorDetails] = []
    for e in err.errors():
        if e["type"] == "extra_forbidden" and len(e["loc"]) == 1:
            allowed = ", ".join(sorted(model.model_fields))
            details.append(InitErrorDetails(
                type=PydanticCustomError("connector_unknown_key",
                                         "unknown key '{key}'; allowed: {allowed}",
                                         {"key": str(e["loc"][0]), "allowed": allowed}),
                loc=e["loc"], input=e["input"]))
        else:
            details.append(InitErrorDetails(type=e["type"], loc=e["loc"], input=e["input"],
                                            ctx=e.get("ctx", {})))
    return ValidationError.from_exception_data(err.title, details)
