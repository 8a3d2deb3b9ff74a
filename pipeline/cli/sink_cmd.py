"""CLI: dx sink run ROUTE; dx tasks list|show|retry|skip|export."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
