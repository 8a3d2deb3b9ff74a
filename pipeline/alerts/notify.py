"""Notification channels. A channel raises on failure; the engine keeps the incident's state
unchanged so the next evaluation tries again (an alert is never silently dropped)."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from typing import Any, Protocol

import httpx

from pipeline.config.alerts import EmailConfig, WebhookConfig
from pipeline.errors import TransientError
from pipeline.observability.logging import redact


class Channel(Protocol):
    name: str

    def send(self, subject: str, body: str, doc: dict[str, Any]) -> None: ...


class EmailChannel:
    """Mail to ``to`` through the configured SMTP server."""

    def __init__(self, cfg: EmailConfig, to: list[str] | None = None) -> None:
        self.cfg = cfg
        self.to = sorted(to if to is not None else cfg.to)
        self.name = "email:" + ",".join(self.to)

    def send(self, subject: str, body: str, doc: dict[str, Any]) -> None:
        c = self.cfg
        msg = EmailMessage()
        msg["Subject"] = subject
        msg["From"] = c.from_addr
        msg["To"] = ", ".join(self.to)
        msg["X-Dx-Incident"] = str(doc.get("incident"))
        msg.set_content(body)
        try:
            smtp: smtplib.SMTP
            if c.ssl:
                smtp = smtplib.SMTP_SSL(c.host, c.port, timeout=c.timeout_s,
                                        context=ssl.create_default_context())
            else:
                smtp = smtplib.SMTP(c.host, c.port, timeout=c.timeout_s)
            with smtp:
                if not c.ssl and c.starttls is not False:
                    smtp.ehlo()
                    if c.starttls is True or smtp.has_extn("starttls"):
                        smtp.starttls(context=ssl.create_default_context())
                        smtp.ehlo()
                if c.username and c.password is not None:
                    smtp.login(c.username, c.password.get_secret_value())
                smtp.send_message(msg)
        except (OSError, smtplib.SMTPException) as err:
            raise TransientError(f"SMTP {c.host}:{c.port}: {type(err).__name__}: {err}") from None


class WebhookChannel:
    def __init__(self, cfg: WebhookConfig) -> None:
        self.cfg = cfg
        self.name = "webhook:" + redact(cfg.url)

    def send(self, subject: str, body: str, doc: dict[str, Any]) -> None:
        headers = {k: v.get_secret_value() for k, v in self.cfg.headers.items()}
        try:
            r = httpx.post(self.cfg.url, json={**doc, "subject": subject, "text": body},
                           headers=headers, timeout=self.cfg.timeout_s)
        except httpx.HTTPError as err:
            raise TransientError(f"alert webhook: {type(err).__name__}") from None
        if r.status_code >= 300:
            raise TransientError(f"alert webhook answered HTTP {r.status_code}")
