"""CLI: dx source run ROUTE; dx import FILE; dx export TABLE."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
