"""The ``alerts:`` block of dx.yaml. Every rule is optional; a missing rule never fires.

Secrets (the SMTP password, webhook headers that carry tokens) come from ``${VAR}``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmailConfig(_Base):
    """SMTP delivery (smtplib). ``ssl`` is implicit TLS (port 465). ``starttls``: ``auto``
    (default) upgrades the connection when the server offers STARTTLS and sends in plain text
    when it does not (a local relay); ``true`` requires it; ``false`` never upgrades."""

    host: str
    port: int = Field(587, ge=1, le=65535)
    ssl: bool = False
    starttls: Literal["auto"] | bool = Field("auto", description="auto, true or false")
    username: str | None = None
    password: SecretStr | None = Field(None, description="from ${VAR}")
    from_addr: str = Field("dx@localhost", description="From: address")
    to: list[str] = Field(default_factory=list, description="recipients of every alert")
    timeout_s: float = Field(10, gt=0)


class WebhookConfig(_Base):
    """POST a JSON document per notification (Slack/Teams/Opsgenie relays accept this)."""

    url: str
    headers: dict[str, SecretStr] = Field(default_factory=dict, description="values from ${VAR}")
    timeout_s: float = Field(10, gt=0)


RuleName = Literal["dead_tasks", "failure_rate", "consumer_lag", "backlog_age", "target_down",
                   "replication_slot"]


class Recipients(_Base):
    """Who else hears about some routes or rules (besides ``email.to`` and ``webhook``): an
    ERP team gets its route's alerts, on-call gets every ``target_down``."""

    routes: list[str] | None = Field(None, description="only these routes (default: all)")
    rules: list[RuleName] | None = Field(None, description="only these rules (default: all)")
    email: list[str] = Field(default_factory=list, description="extra mail recipients")
    webhook: WebhookConfig | None = Field(None, description="an extra webhook")


class FailureRateRule(_Base):
    """Share of a route's tasks updated in the window that are not succeeding."""

    threshold: float = Field(0.05, gt=0, le=1, description="fraction, e.g. 0.05 = 5 %")
    window_s: float = Field(300, gt=0)
    min_tasks: int = Field(20, ge=1, description="no verdict on fewer tasks than this")


class RulesConfig(_Base):
    failure_rate: FailureRateRule | None = Field(
        None, description="share of a route's recent tasks failing; off unless set")
    dead_tasks: int | None = Field(1, ge=1, description="dead tasks of one route, at least")
    backlog_age_s: float | None = Field(300, gt=0, description="oldest outbox row, seconds")
    consumer_lag: int | None = Field(None, ge=1, description="messages behind, per route")
    target_down: bool = Field(True, description="a sink route paused by its circuit breaker")
    slot_retained_bytes: int | None = Field(
        1 << 30, ge=1, description="WAL the replication slot keeps (logical capture), bytes")
    slot_confirm_age_s: float | None = Field(
        600, gt=0, description="since the relay last confirmed the replication slot, seconds")


class AlertsConfig(_Base):
    """Where alerts go and when they fire."""

    interval_s: float = Field(30, gt=0, description="evaluation period of 'dx alerts run'")
    email: EmailConfig | None = Field(None, description="send alerts by e-mail (SMTP)")
    webhook: WebhookConfig | None = Field(None, description="POST alerts to a URL")
    rules: RulesConfig = Field(default_factory=RulesConfig, description="when alerts fire")
    recipients: list[Recipients] = Field(
        default_factory=list, description="more recipients per route or per rule")
    subject_prefix: str = Field("[dx]", description="start of every e-mail subject")
