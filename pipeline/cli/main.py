"""The ``dx`` entry point: builds the typer app and prints every dx failure as one line."""

from __future__ import annotations

import logging
import sys

import typer

from pipeline.cli import core_cmd, sink_cmd, source_cmd
from pipeline.errors import DxError

app = typer.Typer(
    name="dx",
    help="dx: real-time, two-way data exchange between PostgreSQL and the systems around it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for module in (core_cmd, sink_cmd, source_cmd):
    module.register(app)


def main() -> None:
    """Console script: run the app; a DxError becomes ``dx: error: ...`` and exit code 1."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(prog_name="dx")
    except DxError as err:
        print(f"dx: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("dx: interrupted", file=sys.stderr)
        sys.exit(130)
