"""An unreachable PostgreSQL is one line that keeps the driver's cause, never a password.

libpq says what happened on its first line ("... failed: Connection refused") and adds a hint
after it; dx used to keep only the hint. A closed port on loopback gives the real driver error
without any service running.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pipeline import db
from pipeline.errors import ServiceUnavailable

SECRET = "s3cr3t-pw"


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed once the socket is: nothing listens there


def test_connect_keeps_the_cause(closed_port: int) -> None:
    url = f"postgresql://dx:{SECRET}@127.0.0.1:{closed_port}/shop"
    with pytest.raises(ServiceUnavailable) as caught:
        db.connect(url, connect_timeout_s=2)
    message = str(caught.value)
    assert message.startswith(f"postgresql unreachable at 127.0.0.1:{closed_port}/shop: ")
    assert "Connection refused" in message
    assert "\n" not in message and SECRET not in message


def test_driver_detail_is_the_first_line_redacted() -> None:
    err = psycopg.OperationalError(
        f"connection failed: password=\"{SECRET}\" was refused\n\tIs the server running?")
    assert db.driver_detail(err) == 'connection failed: password="***" was refused'
    assert db.driver_detail(psycopg.OperationalError("")) == "OperationalError"
    lost = db.unreachable("postgresql://u:p@h:1/d", err, "connection lost")
    assert str(lost).startswith("postgresql unreachable at h:1/d: connection lost: connection")


def test_cli_prints_one_line_with_the_cause(closed_port: int, tmp_path: Path) -> None:
    config = tmp_path / "dx.yaml"
    config.write_text(
        "database: {url: '${DX_DATABASE_URL}', connect_timeout_s: 2}\n"
        "kafka: {bootstrap_servers: 127.0.0.1:1}\n"
        "schema_registry: {url: 'http://127.0.0.1:1'}\n")
    env = {**os.environ,
           "DX_DATABASE_URL": f"postgresql://dx:{SECRET}@127.0.0.1:{closed_port}/shop"}
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "init", "-c", str(config)],
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"dx: error: postgresql unreachable at 127.0.0.1:{closed_port}/shop")
    assert "Connection refused" in lines[0] and SECRET not in run.stderr
