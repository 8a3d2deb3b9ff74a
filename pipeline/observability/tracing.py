"""OpenTelemetry trace context carried in Kafka record headers.

An event crosses several processes (database → relay → topic → sink → target, or third party →
inbound topic → source worker → database). Carrying the W3C ``traceparent``/``tracestate`` headers
on every record lets a tracing backend stitch those hops into one trace, and lets a log line carry
the trace id of the event it is about (see :mod:`pipeline.observability.logging`).

Only ``opentelemetry-api`` is required. Without an SDK configured, no spans are recorded, but
context still *passes through*: :func:`extract` turns incoming headers into a context holding the
remote span, and :func:`inject` writes that same context onto outgoing records (a dead-letter
record, a re-published event), so a deployment that does run an SDK and collector sees one
unbroken trace. Which header formats are used comes from the globally configured propagator
(W3C trace context + baggage by default; ``OTEL_PROPAGATORS`` changes it).

Kafka headers are ``[(key, bytes)]`` as confluent-kafka returns them (a dict is accepted too);
values are written as UTF-8 bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter

HeaderValue = bytes | str | None
#: What confluent-kafka's ``Message.headers()`` returns (or accepts in ``produce(headers=...)``).
KafkaHeaders = Sequence[tuple[str, HeaderValue]] | Mapping[str, HeaderValue]

TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


def _text(value: HeaderValue) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _pairs(headers: KafkaHeaders | None) -> list[tuple[str, HeaderValue]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


class _KafkaGetter(Getter[list[tuple[str, HeaderValue]]]):
    """Reads header values by case-insensitive key; Kafka allows repeated keys."""

    def get(self, carrier: list[tuple[str, HeaderValue]], key: str) -> list[str] | None:
        wanted = key.lower()
        values = [t for k, v in carrier if k.lower() == wanted and (t := _text(v)) is not None]
        return values or None

    def keys(self, carrier: list[tuple[str, HeaderValue]]) -> list[str]:
        return [k for k, _ in carrier]


class _KafkaSetter(Setter[dict[str, str]]):
    def set(self, carrier: dict[str, str], key: str, value: str) -> None:
        carrier[key] = value


_GETTER = _KafkaGetter()
_SETTER = _KafkaSetter()


def inject(headers: KafkaHeaders | None = None, context: Context | None = None,
           ) -> list[tuple[str, bytes | str | None]]:
    """``headers`` plus the trace headers of ``context`` (default: the current context).

    Existing trace headers are replaced, not duplicated, so re-publishing a consumed record with
    a new context is safe. Returns a new list; the input is not modified. When there is no valid
    span in the context, the headers come back without trace headers.
    """
    fields: dict[str, str] = {}
    propagate.inject(fields, context=context, setter=_SETTER)
    injected = {k.lower() for k in fields}
    out: list[tuple[str, bytes | str | None]] = [
        (k, v) for k, v in _pairs(headers) if k.lower() not in injected]
    out.extend((k, v.encode("utf-8")) for k, v in fields.items())
    return out


def extract(headers: KafkaHeaders | None, context: Context | None = None) -> Context:
    """The context carried by a record's headers (empty context when there is none)."""
    return propagate.extract(_pairs(headers), context=context, getter=_GETTER)


@contextmanager
def attached(headers: KafkaHeaders | None) -> Iterator[Context]:
    """Make the record's context current while processing it::

        with tracing.attached(msg.headers()):
            log.info("delivering")          # carries trace_id/span_id
            producer.produce(dlq, headers=tracing.inject(msg.headers()))
    """
    ctx = extract(headers)
    token = otel_context.attach(ctx)
    try:
        yield ctx
    finally:
        otel_context.detach(token)


def trace_id(headers: KafkaHeaders | None) -> str | None:
    """The 32-hex-digit trace id carried by ``headers``, or None (for task logs, alerts)."""
    span_context = trace.get_current_span(extract(headers)).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None
