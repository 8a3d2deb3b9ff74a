"""The console's and pausing's CLI failures are one line with a non-zero exit, before any
database is needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONFIG = """
database: {url: "postgresql://nobody@127.0.0.1:9/none"}
kafka: {bootstrap_servers: "127.0.0.1:9"}
schema_registry: {url: "http://127.0.0.1:9"}
sinks:
  - name: pim
    topics: [shop.public.products]
    connector: {type: http, url: "http://127.0.0.1:9/x"}
"""


def dx(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "dx.yaml"
    cfg.write_text(CONFIG)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DX_CONSOLE_PASSWORD": "long enough"})


def test_pausing_an_unknown_route_names_the_routes_there_are(tmp_path: Path) -> None:
    done = dx(tmp_path, "sink", "pause", "erp")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"dx: error: no sink route 'erp' in {tmp_path / 'dx.yaml'} (routes: pim)"]
    done = dx(tmp_path, "source", "resume", "pim")
    assert done.returncode == 1 and "no source route 'pim'" in done.stderr


def test_a_bad_role_and_half_a_tls_setup_are_one_line_each(tmp_path: Path) -> None:
    done = dx(tmp_path, "console", "user", "add", "ana", "--role", "root")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "unknown role 'root'" in done.stderr
    done = dx(tmp_path, "console", "serve", "--tls-cert", "x.pem")
    assert done.returncode == 1
    assert done.stderr.strip() == "dx: error: give both --tls-cert and --tls-key, or neither"
