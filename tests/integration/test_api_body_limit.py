"""Request bodies are limited before they are read, on every endpoint and unauthenticated: a
declared Content-Length above the limit is answered 413 at once (the body is never awaited), and
a chunked body is cut off as soon as it passes the limit (the server does not buffer it all)."""

from __future__ import annotations

import json
import select
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.integration.test_api_support import API_SECTION, KEYS, SCHEMA, serve, write_config

LIMIT = 65536


def exchange(url: str, head: str, chunks: list[bytes], timeout_s: float = 20) -> tuple[int, Any,
                                                                                      int]:
    """Send ``head`` then ``chunks`` on a raw socket, stopping as soon as a response arrives;
    return (status, JSON body, bytes of body sent)."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout_s) as sock:
        sock.sendall(head.encode())
        sent = 0
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered already
            try:
                sock.sendall(chunk)
            except OSError:
                break  # it closed the connection after answering
            sent += len(chunk)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            part = sock.recv(65536)  # a timeout here: the server is still waiting for the body
            if not part:
                break
            data += part
    header, _, body = data.partition(b"\r\n\r\n")
    return int(header.split()[1]), json.loads(body[:_length(data)]), sent


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


@pytest.fixture
def api_url(pg_db: str, stack: Any, tmp_path: Path) -> Any:
    with psycopg.connect(pg_db) as conn:
        conn.execute(SCHEMA)  # type: ignore[arg-type]
    api = API_SECTION.replace("\napi:\n", f"\napi:\n  max_body_bytes: {LIMIT}\n", 1)
    with serve(write_config(tmp_path / "dx.yaml", pg_db, stack, api=api)) as served:
        yield served.url


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(api_url: str) -> None:
    for path in ("/oauth/token", "/products", "/products/1", "/-/reload", "/nothing-here"):
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {400 * 1024 * 1024}\r\n\r\n")
        status, body, _ = exchange(api_url, head, [b"{" * 1024])  # 400 MB declared, 1 KiB sent
        limit = 8192 if path == "/oauth/token" else LIMIT
        assert (status, body) == (413, {"errors": [{
            "code": "payload_too_large",
            "message": f"the request body is larger than {limit} bytes"}]}), path


def test_a_streamed_body_is_cut_off_at_the_limit(api_url: str) -> None:
    for path in ("/oauth/token", "/products"):
        streamed_is_cut_off(api_url, path)


def streamed_is_cut_off(api_url: str, path: str) -> None:
    key = "" if path == "/oauth/token" else f"X-Api-Key: {KEYS['TEST_API_KEY_PIM']}\r\n"
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{key}"
            "Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"  # 16 KiB chunks, up to 32 MiB
    status, body, sent = exchange(api_url, head, [chunk] * 2048)
    assert status == 413 and body["errors"][0]["code"] == "payload_too_large"
    assert sent < 2048 * len(chunk)  # answered while the client was still sending
