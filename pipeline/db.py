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

#: jsonb numbers become Decimal so numeric(p, s) values keep every digit on their way to Avro.
json_loads_exact = partial(json.loads, parse_float=Decimal)


def redact(url: str) -> str:
    """host:port/db of a URL, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path or ''}"


def connect(url: str, *, autocommit: bool = False, application_name: str = "dx",
            connect_timeout_s: float = 5.0, exact_json: bool = False,
            **kwargs: Any) -> psycopg.Connection[Any]:
    """Open a psycopg connection; raise ServiceUnavailable (one clear line) when it fails."""
    try:
        conn = psycopg.connect(url, autocommit=autocommit, application_name=application_name,
                               connect_timeout=max(1, int(connect_timeout_s)), **kwargs)
    except psycopg.OperationalError as err:
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ServiceUnavailable("postgresql", redact(url), detail) from None
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
