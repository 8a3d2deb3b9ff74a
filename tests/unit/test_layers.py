"""Imports run one way through the layers (CONTRIBUTING.md's map): observability/errors ->
db -> config -> capture/connectors/tasks/routes -> events -> relay/sink/source/alerts/status ->
api/csvio/inbound/console -> cli. The contract is ``[tool.importlinter]`` in pyproject.toml;
import-linter reads every import in pipeline/ and connectors/, function-level ones included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[2]


def test_imports_follow_the_layers(capsys: pytest.CaptureFixture[str]) -> None:
    cwd = Path.cwd()
    os.chdir(ROOT)  # import-linter reads pyproject.toml from the working directory
    try:
        code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True,
                            no_logo=True)
    finally:
        os.chdir(cwd)
    report = capsys.readouterr().out
    assert code == 0, report
