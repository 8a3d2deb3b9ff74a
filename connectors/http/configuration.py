"""Settings of the ``http`` connector (the ``connector:`` block of a route with ``type: http``).

Secrets (tokens, passwords, client secrets, signing keys) are ``SecretStr`` and must come from
``${VAR}`` in dx.yaml; they never appear in logs, task export logs or error messages.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from connectors.base import ConnectorSettings
from pipeline.config.auth import BasicAuth, BearerAuth, HmacAuth, OAuth2ClientCredentials
from pipeline.config.sinks import Op
from pipeline.templates import template_paths

Auth = Annotated[BearerAuth | BasicAuth | OAuth2ClientCredentials | HmacAuth,
                 Field(discriminator="kind")]


class BulkConfig(BaseModel):
    """A batch endpoint: one request carries many records. With ``results`` the target's
    answer says per record what happened; without, a refused request (4xx) is split in halves
    until the refused records stand alone (the others are delivered)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="bulk endpoint (no placeholders)")
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    max_batch: int = Field(100, ge=1, le=10_000)
    wrap: str | None = Field(None, description="send {wrap: [...]} instead of a bare array")
    results: str | None = Field(
        None, description="field of the JSON answer with one result per record, in order "
        "('.' for a bare array); a result with a 'status' code or an 'error' fails its record")


class HttpSettings(ConnectorSettings):
    """Deliver each record as one HTTP request (or many per request with ``bulk``)."""

    type: Literal["http"]
    url: str = Field(description="URL template, e.g. https://erp/api/products/{$key.id}")
    method: Literal["POST", "PUT", "PATCH", "DELETE"] = "POST"
    urls: dict[Op, str] = Field(default_factory=dict, description="URL per op (overrides url)")
    methods: dict[Op, Literal["POST", "PUT", "PATCH", "DELETE"]] = Field(
        default_factory=dict, description="method per op, e.g. {d: DELETE}")
    body: Literal["payload", "envelope"] = Field(
        "payload", description="payload: the mapped object; envelope: {op, key, data, event_id, "
        "table, origin}")
    headers: dict[str, str] = Field(default_factory=dict, description="extra headers (no secrets)")
    auth: Auth | None = None
    idempotency_header: str | None = Field(
        "Idempotency-Key", description="header carrying event_id; null to disable")
    cloudevents: bool = Field(False, description="add CloudEvents binary-mode ce-* headers")
    ce_source: str = Field("dx", description="CloudEvents source attribute")
    ce_type_prefix: str = Field("dx", description="ce-type = <prefix>.<table>.<created|...>")
    bulk: BulkConfig | None = None
    timeout_s: float = Field(10, gt=0, le=600, description="whole-request timeout")
    connect_timeout_s: float = Field(5, gt=0, le=120)
    rate_limit_per_s: float | None = Field(None, gt=0, description="max requests per second")
    max_connections: int = Field(16, ge=1, le=1000)
    ok_statuses: list[int] = Field(
        default_factory=list, description="non-2xx statuses that count as delivered (e.g. 409)")
    verify_tls: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        template_paths(v)
        if not v.startswith(("http://", "https://", "{")):
            raise ValueError("must start with http:// or https://")
        return v

    @field_validator("urls")
    @classmethod
    def _urls(cls, v: dict[str, str]) -> dict[str, str]:
        for t in v.values():
            template_paths(t)
        return v
