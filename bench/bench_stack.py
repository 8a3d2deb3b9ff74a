"""What every benchmark needs from the real stack: the three service addresses and a fresh
database to measure in."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("DX_DATABASE_URL", "DX_KAFKA_BOOTSTRAP", "DX_SCHEMA_REGISTRY_URL")


def services() -> dict[str, str]:
    """DX_* from the environment when all three are set, else ``deploy/local/stack up``."""
    if all(os.environ.get(k) for k in KEYS):
        return {k: os.environ[k] for k in KEYS}
    subprocess.run([str(ROOT / "deploy/local/stack"), "up"], check=True,
                   stdout=subprocess.DEVNULL)
    out = subprocess.run([str(ROOT / "deploy/local/stack"), "env"], check=True,
                         capture_output=True, text=True).stdout
    return dict(re.findall(r"export (\w+)=(\S+)", out))


def fresh_db(admin_url: str, prefix: str = "bench") -> str:
    """A new, empty database on the same server; its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name
