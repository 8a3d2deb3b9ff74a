"""The ``dx`` entry point: builds the typer app and prints every dx failure as one line."""

from __future__ import annotations

import sys

import typer

from pipeline.cli import (
    api_cmd,
    console_cmd,
    core_cmd,
    inbound_cmd,
    outbox_cmd,
    sink_cmd,
    source_cmd,
)
from pipeline.errors import DxError
from pipeline.observability.logging import FORMAT_ENV, LEVEL_ENV, redact, setup_logging

app = typer.Typer(
    name="dx",
    help="dx: real-time, two-way data exchange between PostgreSQL and the systems around it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _global(
    log_level: str = typer.Option("WARNING", "--log-level", envvar=LEVEL_ENV,
                                  help="DEBUG, INFO, WARNING or ERROR; workers in containers "
                                       "usually run with INFO"),
    log_format: str = typer.Option("auto", "--log-format", envvar=FORMAT_ENV,
                                   help="auto (text on a terminal, JSON otherwise), json, text"),
) -> None:
    """dx: real-time, two-way data exchange between PostgreSQL and the systems around it."""
    try:
        setup_logging(log_level, log_format)  # type: ignore[arg-type]
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


for module in (core_cmd, sink_cmd, source_cmd, inbound_cmd, outbox_cmd, api_cmd, console_cmd):
    module.register(app)


def main() -> None:
    """Console script: run the app; a DxError becomes ``dx: error: ...`` and exit code 1."""
    try:
        app(prog_name="dx")
    except DxError as err:
        # messages name addresses; a URL with user:password in it must not reach the terminal
        print(f"dx: error: {redact(str(err))}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("dx: interrupted", file=sys.stderr)
        sys.exit(130)
