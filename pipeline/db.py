"""PostgreSQL connections for dx: one place that opens them and turns driver failures into
:class:`ServiceUnavailable` with a redacted address (never the password)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import set_json_loads

from pipeline.errors import ServiceUnavailable
from pipeline.observability.logging import redact as redact_secrets

_EXACT = json.JSONDecoder(parse_float=Decimal)


def json_loads_exact(data: str | bytes) -> Any:
    """JSON with numbers as Decimal, so numeric(p, s) values keep every digit on their way to
    Avro. One decoder for every call (``json.loads(..., parse_float=...)`` builds a new one
    each time, a few µs per value on the relay's path). Bytes are decoded as ``json.loads``
    decodes them (UTF-8, a BOM, UTF-16/32)."""
    if not isinstance(data, str):
        data = bytes(data)
        data = data.decode(json.detect_encoding(data), "surrogatepass")
    return _EXACT.decode(data)


def redact(url: str) -> str:
    """host:port/db of a URL, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path or ''}"


#: TCP liveness on every connection, both ends (settings in the URL win). Without them a
#: connection whose peer vanished (network partition, a host that died without a FIN) stays
#: "open" for hours: the client waits on a socket nobody answers, and the server keeps that
#: session's locks (the relay lease) until the kernel gives up (~2 h keepalive, ~15 min of
#: retransmissions). With them a dead peer is noticed within about a minute: idle 10 s,
#: 5 probes 5 s apart; data unacknowledged for 30 s ends the connection.
KEEPALIVES: dict[str, int] = {
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 5,
    "tcp_user_timeout": 30_000,
}
#: the same on the server's side of the connection (session settings, through ``options``)
SERVER_KEEPALIVES = ("-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 "
                     "-c tcp_keepalives_count=5 -c tcp_user_timeout=30000")


def liveness_params(url: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Connection parameters with :data:`KEEPALIVES` filled in where neither the URL nor the
    caller set them, and :data:`SERVER_KEEPALIVES` prepended to any ``options``."""
    given = {**conninfo_to_dict(url), **kwargs}
    params: dict[str, Any] = {k: v for k, v in KEEPALIVES.items() if k not in given}
    options = str(given.get("options") or "")
    if "tcp_keepalives" not in options and "tcp_user_timeout" not in options:
        params["options"] = f"{SERVER_KEEPALIVES} {options}".strip()
    return {**kwargs, **params}


def driver_detail(err: BaseException) -> str:
    """The driver's first line, redacted: the cause in one line.

    libpq puts the cause first ("connection to server at ..., port 5432 failed: Connection
    refused") and a hint after it ("Is the server running on that host ...?"), so the first line
    is the one to keep: the last one would say where to look but not what happened."""
    for line in str(err).splitlines():
        if line.strip():
            return redact_secrets(" ".join(line.split()))
    return type(err).__name__


def unreachable(url: str, err: BaseException, context: str = "") -> ServiceUnavailable:
    """``postgresql unreachable at host:port/db: [context: ]<driver's first line>``."""
    detail = driver_detail(err)
    return ServiceUnavailable("postgresql", redact(url), f"{context}: {detail}" if context
                              else detail)


def connect(url: str, *, autocommit: bool = False, application_name: str = "dx",
            connect_timeout_s: float = 5.0, exact_json: bool = False,
            **kwargs: Any) -> psycopg.Connection[Any]:
    """Open a psycopg connection; raise ServiceUnavailable (one clear line) when it fails."""
    try:
        conn = psycopg.connect(url, autocommit=autocommit, application_name=application_name,
                               connect_timeout=max(1, int(connect_timeout_s)),
                               **liveness_params(url, kwargs))
    except psycopg.OperationalError as err:
        raise unreachable(url, err) from None
    if exact_json:
        set_json_loads(json_loads_exact, conn)
    return conn


@contextmanager
def connection(url: str, **kwargs: Any) -> Iterator[psycopg.Connection[Any]]:
    conn = connect(url, **kwargs)
    try:
        yield conn
    finally:
        conn.close()
