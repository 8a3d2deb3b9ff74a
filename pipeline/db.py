"""PostgreSQL connections for dx: one place that opens them and turns driver failures into
:class:`ServiceUnavailable` with a redacted address (never the password)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.types.json import set_json_loads

from pipeline.errors import ServiceUnavailable
from pipeline.observability.logging import redact as redact_secrets

#: jsonb numbers become Decimal so numeric(p, s) values keep every digit on their way to Avro.
json_loads_exact = partial(json.loads, parse_float=Decimal)


def redact(url: str) -> str:
    """host:port/db of a URL, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path or ''}"


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
                               connect_timeout=max(1, int(connect_timeout_s)), **kwargs)
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
