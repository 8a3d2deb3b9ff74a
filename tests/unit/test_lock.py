"""uv.lock is the one lock of runtime and test dependencies, and it agrees with pyproject.toml.

`./dev setup`, CI (through it) and the image install from it; `./dev lock` refreshes it. The
check is uv's own (`uv lock --check`), offline: it reads the lock and pyproject.toml only.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from uv import find_uv_bin

REPO = Path(__file__).resolve().parents[2]


def test_lock_agrees_with_pyproject() -> None:
    run = subprocess.run([find_uv_bin(), "lock", "--check", "--offline", "--quiet"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, (
        "pyproject.toml and uv.lock disagree: run `./dev lock` and commit uv.lock\n" + run.stderr)


def test_every_installer_uses_the_lock() -> None:
    dev = (REPO / "dev").read_text()
    assert "--locked" in dev and "--require-hashes" in dev
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^COPY .*\buv\.lock\b", dockerfile, re.M)
    assert "--require-hashes -r /tmp/requirements.txt" in dockerfile
    assert "# syntax=" not in dockerfile  # BuildKit would fetch a frontend image from a registry
    # the image pins nothing of its own: the build args default to empty (PyPI, system CAs)
    assert re.search(r"^ARG PIP_INDEX_URL=$", dockerfile, re.M)
    assert re.search(r"^ARG CA_BUNDLE=$", dockerfile, re.M)
