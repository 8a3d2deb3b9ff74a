"""CLI: dx init, validate, capture, relay, snapshot, schemas, status."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import ConfigOption, config_from


def validate(config: Path = ConfigOption) -> None:
    """Check dx.yaml (and, with a reachable database, its tables against the catalog)."""
    cfg = config_from(config)
    typer.echo(f"{config}: ok ({len(cfg.tables)} tables, {len(cfg.sinks)} sinks, "
               f"{len(cfg.sources)} sources)")


def register(app: typer.Typer) -> None:
    app.command()(validate)
