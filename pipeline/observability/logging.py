"""Log set-up for every dx process: JSON for machines, text for people, secrets never.

Library code only ever does ``log = logging.getLogger(__name__)``; the *process* decides once, in
its entry point, how records are rendered by calling :func:`setup_logging`:

* ``fmt="auto"`` (default) — text when stderr is a terminal (someone is watching), one JSON object
  per line otherwise (a container runtime or a log shipper is reading);
* every record gets ``trace_id``/``span_id`` when an OpenTelemetry span context is current (see
  :mod:`pipeline.observability.tracing`), so a log line can be joined with the trace of the event
  it was about;
* every rendered line passes through :func:`redact`: passwords in connection URLs
  (``postgresql://user:secret@host``), ``password=...`` settings, ``Authorization`` header values,
  webhook URLs whose path is the credential and ``sig=``/``signature=``/``key=`` query parameters
  are replaced by ``***`` — a driver error or a debug dump of request headers must not put a
  credential into a log store that many people can read.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Literal, TextIO

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["auto", "json", "text"]

#: Environment twins of ``--log-level`` and ``--log-format``.
LEVEL_ENV = "DX_LOG_LEVEL"
FORMAT_ENV = "DX_LOG_FORMAT"

MASK = "***"

#: librdkafka's own log lines (connection retries, every few ms while a broker is down). Every
#: client dx creates logs through this one logger; its errors also reach dx as exceptions or
#: events, which dx reports once with context, so entry points keep it at CRITICAL unless the
#: operator asks for DEBUG.
KAFKA_LOG = logging.getLogger("dx.librdkafka")

# scheme://user:password@host — the password may itself contain '@' (unencoded), so take
# everything up to the last '@' before the host part ends (whitespace, quote, '/').
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s\"']*:)(?P<secret>[^\s/\"']*)(?=@)")
# libpq key/value strings and settings: password=secret, PGPASSWORD=x, "api_key": "secret",
# a signing header "X-Dx-Signature: sha256=..."
_KEY_VALUE = re.compile(
    r"(?P<head>\b[\w.-]*?(?:password|passwd|pwd|secret|api[_-]?key|token|signature)"
    r"[\"']?\s*[=:]\s*[\"']?)(?P<secret>[^\s\"',;&}]+)",
    re.IGNORECASE)
# Query parameters that are credentials by themselves: pre-signed URLs (sig=, signature=,
# X-Amz-Signature=) and API keys in the query (key=, apikey=).
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?:sig|signature|x-amz-signature|x-goog-signature|key|apikey|api-key|"
    r"hmac)=)(?P<secret>[^&\s\"'#<>]+)",
    re.IGNORECASE)
# Webhook URLs whose path is the credential (anyone who has it can post): chat services
# (/services/T../B../<token>, /api/webhooks/<id>/<token>, /hooks/<token>, Teams'
# /webhookb2/.../IncomingWebhook/...), generic /webhook/<token>, and bot tokens (/bot<id>:<token>).
_WEBHOOK_PATH = re.compile(
    r"(?P<head>/(?:services/(?=T\w+/B\w+/)|webhooks?/|webhookb2/|hooks/|bot(?=\d+:)))"
    r"(?P<secret>[^\s\"'?#<>]+)",
    re.IGNORECASE)
# Authorization / Proxy-Authorization header values, plain ("Authorization: Bearer x") or in a
# dict repr ("'authorization': 'Basic x'"); the value runs to the end of the quoted string/line.
_AUTH_HEADER = re.compile(
    r"(?P<head>\bauthorization[\"']?\s*[:=]\s*[\"']?)(?P<secret>[^\"'\r\n,}]+)",
    re.IGNORECASE)
_PATTERNS = (_URL_PASSWORD, _AUTH_HEADER, _WEBHOOK_PATH, _QUERY_SECRET, _KEY_VALUE)


def redact(text: str) -> str:
    """``text`` with credentials replaced by ``***`` (URL passwords, password=, Authorization,
    webhook URL paths, signature and key query parameters)."""
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group("head") + MASK, text)
    return text


def is_secret_name(name: str) -> bool:
    """Whether a header or field called ``name`` holds a credential (its value is masked
    whole wherever dx shows it: logs, export logs)."""
    low = name.lower()
    if low == "idempotency-key":  # the event id: what an operator looks for, not a secret
        return False
    return low in ("authorization", "proxy-authorization", "cookie", "set-cookie") or any(
        part in low for part in ("signature", "token", "key", "secret", "auth", "session"))


class RedactFilter(logging.Filter):
    """Redact the message of every record before any formatter or other filter sees it.

    The message is rendered once (``msg % args``), redacted, and stored back with ``args``
    cleared, so handlers added later by someone else see the redacted text too. String-valued
    ``extra=`` fields are redacted as well.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let logging report it as usual
            return True
        redacted = redact(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


class TraceContextFilter(logging.Filter):
    """Add ``trace_id`` and ``span_id`` (hex) when an OpenTelemetry span context is current."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        return True


class _RedactingText(logging.Formatter):
    """Text lines; redacts the whole line so tracebacks are covered too."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            line = f"{line} [trace_id={trace_id}]"
        return redact(line)


class _RedactingJson(JsonFormatter):
    """One JSON object per line; redacts every string field (tracebacks included) *before*
    serialization, so a masked value can never break the JSON escaping of the line."""

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {k: _redact_value(v) for k, v in super().process_log_record(log_data).items()}


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
_MARK = "_dx_handler"
# Libraries that log whole URLs or headers at INFO: quiet unless we are debugging.
_CHATTY = ("httpx", "httpx2", "httpcore", "urllib3", "kafka", "confluent_kafka")


def resolve_format(fmt: LogFormat, stream: TextIO) -> Literal["json", "text"]:
    """``auto`` becomes ``text`` on a terminal and ``json`` everywhere else."""
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return "text" if callable(isatty) and isatty() else "json"
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be auto, json or text, got {fmt!r}")
    return fmt


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes: a CLI runner or a test that
    swapped stderr and closed its stand-in would otherwise leave every later line failing."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(level: int | str = "INFO", fmt: LogFormat = "auto", *,
                  stream: TextIO | None = None,
                  static_fields: dict[str, Any] | None = None) -> logging.Handler:
    """Configure the root logger for this process; call once from the entry point.

    Idempotent: a second call replaces the handler a first call installed (other handlers, e.g.
    pytest's capture, are left alone). ``static_fields`` are added to every JSON line — a worker
    passes ``{"role": "sink", "route": "pim"}`` so logs can be filtered like metrics. Logs go to
    stderr by default, keeping stdout free for command output (``dx status --json``).
    """
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    stream = handler.stream
    setattr(handler, _MARK, True)
    if resolve_format(fmt, stream) == "json":
        handler.setFormatter(_RedactingJson(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            static_fields=dict(static_fields or {}),
            timestamp="time"))
    else:
        handler.setFormatter(_RedactingText(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(RedactFilter())
    handler.addFilter(TraceContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    KAFKA_LOG.setLevel(logging.DEBUG if numeric <= logging.DEBUG else logging.CRITICAL)
    return handler


def setup_from_env(default_level: str = "INFO") -> logging.Handler:
    """:func:`setup_logging` from ``DX_LOG_LEVEL`` / ``DX_LOG_FORMAT`` (non-CLI entry points)."""
    fmt = os.environ.get(FORMAT_ENV, "auto").strip().lower() or "auto"
    if fmt not in ("auto", "json", "text"):
        raise ValueError(f"{FORMAT_ENV} must be auto, json or text, got {fmt!r}")
    level = os.environ.get(LEVEL_ENV, default_level).strip() or default_level
    return setup_logging(level, fmt)  # type: ignore[arg-type]
