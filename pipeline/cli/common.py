"""What every dx command shares: loading the configuration and turning errors into one line."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from pipeline.config import DxConfig, load_config

ConfigOption = typer.Option(
    Path("dx.yaml"), "--config", "-c", envvar="DX_CONFIG", help="path to dx.yaml"
)


def config_from(path: Path | None) -> DxConfig:
    return load_config(path or Path(os.environ.get("DX_CONFIG", "dx.yaml")))
