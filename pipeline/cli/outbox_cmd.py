"""CLI: ``dx outbox quarantine SEQ:ID`` and ``dx outbox quarantined``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli.common import ConfigOption, config_from
from pipeline.db import connection

outbox_app = typer.Typer(help="The outbox: rows the relay cannot publish.", no_args_is_help=True)


@outbox_app.command("quarantine")
def quarantine_cmd(position: str = typer.Argument(..., help="SEQ:ID from the relay's error line"),
                   reason: str = typer.Option(..., "--reason", "-r",
                                              help="why the row is set aside (kept with it)"),
                   config: Path = ConfigOption) -> None:
    """Set one outbox row aside so the relay can go on; it is kept in dx.outbox_quarantine."""
    from pipeline.capture.quarantine import parse_position, quarantine

    cfg = config_from(config)
    seq, id_ = parse_position(position)
    with connection(cfg.database.url.get_secret_value(), autocommit=True) as conn:
        entity, key = quarantine(conn, seq, id_, reason)
    typer.echo(f"outbox row {seq}:{id_} ({entity}, key {key}) quarantined; the relay can go on")


@outbox_app.command("quarantined")
def quarantined_cmd(config: Path = ConfigOption) -> None:
    """List quarantined outbox rows."""
    from pipeline.capture.quarantine import quarantined

    cfg = config_from(config)
    with connection(cfg.database.url.get_secret_value(), autocommit=True) as conn:
        rows = quarantined(conn)
    table = Table("seq:id", "entity", "key", "reason", "quarantined at")
    for r in rows:
        table.add_row(f"{r.seq}:{r.id}", r.entity, r.key or "", r.reason, str(r.quarantined_at))
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(outbox_app, name="outbox")
