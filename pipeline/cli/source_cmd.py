"""CLI: dx source run ROUTE; dx import FILE; dx export TABLE."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.cli.common import (
    ConfigOption,
    MetricsHostOption,
    MetricsPortOption,
    config_from,
    worker_server,
)
from pipeline.cli.shutdown import graceful_shutdown
from pipeline.csvio.exporter import export_csv
from pipeline.csvio.importer import import_csv, wait_applied
from pipeline.db import connection
from pipeline.errors import TerminalError

source_app = typer.Typer(help="Inbound routes: apply third-party changes to the database.",
                         no_args_is_help=True)


@source_app.command("run")
def run(route: str = typer.Argument(..., help="source route name (dx.yaml 'sources:')"),
        config: Path = ConfigOption,
        stop_when_idle: float | None = typer.Option(
            None, "--stop-when-idle", envvar="DX_SOURCE_STOP_WHEN_IDLE",
            help="exit after this many seconds without messages (batch jobs, tests)"),
        verbose: bool = typer.Option(False, "--verbose", "-v", envvar="DX_VERBOSE",
                                     help="log each batch and every failed event"),
        metrics_port: int = MetricsPortOption,
        metrics_host: str = MetricsHostOption,
        accept_retention_gap: bool = typer.Option(
            False, "--accept-retention-gap",
            help="continue when Kafka deleted messages (retention) before they were applied; "
                 "without it the worker stops and names them"),
        accept_topic_reset: bool = typer.Option(
            False, "--accept-topic-reset",
            help="when a stored offset is beyond its partition's end (topic re-created, another "
                 "cluster), apply the partition from its start; without it the worker stops")
        ) -> None:
    """Consume ROUTE's topic and apply it to its table exactly once (Ctrl-C / SIGTERM stops
    after the current batch; a second signal exits now: the batch in hand is rolled back)."""
    from pipeline.source.worker import SourceWorker

    if verbose:
        logging.getLogger("pipeline").setLevel(logging.INFO)
    cfg = config_from(config)
    server = worker_server(metrics_port, metrics_host)
    try:
        worker = SourceWorker(cfg, route, stop_when_idle_s=stop_when_idle, server=server,
                              accept_retention_gap=accept_retention_gap,
                              accept_topic_reset=accept_topic_reset)
        with graceful_shutdown(worker.stop):
            stats = worker.run()
    finally:
        server.close()
    typer.echo(f"route {route}: {stats.applied} applied, {stats.failed} dead, "
               f"{stats.skipped} skipped in {stats.batches} batches", err=True)


def _bar(label: str) -> Progress:
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True))


def import_cmd(
        file: Path = typer.Argument(..., help="CSV file with a header of the route's fields"),
        entity: str | None = typer.Option(None, "--entity", "-e", envvar="DX_IMPORT_ENTITY",
                                          help="the source route to import through"),
        table: str | None = typer.Option(None, "--table", "-t", envvar="DX_IMPORT_TABLE",
                                         help="target table (its one source route is used)"),
        rejects: Path | None = typer.Option(None, "--rejects", envvar="DX_IMPORT_REJECTS",
                                            help="reject file (default FILE.rejects.csv)"),
        dry_run: bool = typer.Option(False, "--dry-run", help="validate only, send nothing"),
        wait: float | None = typer.Option(
            None, "--wait", envvar="DX_IMPORT_WAIT",
            help="wait up to this many seconds for the route's worker to apply the rows"),
        config: Path = ConfigOption) -> None:
    """Validate a CSV file and send its rows through a source route (same apply, tasks and
    alerts as any producer). Re-importing the same file changes nothing."""
    cfg = config_from(config)
    with _bar(f"import {file.name}") as bar:
        task = bar.add_task("rows", total=None)
        result = import_csv(cfg, file, entity=entity, table=table, reject_file=rejects,
                            dry_run=dry_run,
                            progress=lambda d, t: bar.update(task, completed=d, total=t))
    good = result.rows - result.rejected if dry_run else result.produced
    verb = "valid" if dry_run else f"sent to {result.topic}"
    typer.echo(f"import {file}: {result.rows} rows, {good} {verb}, {result.rejected} rejected")
    if wait is not None and not dry_run and result.end_offsets:
        route = next(r for r in cfg.sources if r.name == result.route)
        with connection(cfg.database.url.get_secret_value()) as conn:
            if not wait_applied(conn, route, result.end_offsets, wait):
                raise TerminalError(f"route {route.name} did not apply the import within "
                                    f"{wait:g}s (is 'dx source run {route.name}' running?)")
        typer.echo(f"import {file}: applied by route {result.route}")
    if result.rejected:
        raise TerminalError(f"{result.rejected} of {result.rows} rows rejected; lines and "
                            f"reasons in {result.reject_file}")


def export_cmd(
        table: str = typer.Argument(..., help="a table listed under 'tables:' in dx.yaml"),
        output: Path | None = typer.Option(None, "--output", "-o", envvar="DX_EXPORT_OUTPUT",
                                           help="CSV file to write (default stdout)"),
        config: Path = ConfigOption) -> None:
    """Write a consistent CSV snapshot of TABLE's exposed columns (streaming)."""
    cfg = config_from(config)
    if output is None:
        rows = export_csv(cfg, table, None)
        return
    with _bar(f"export {table}") as bar:
        task = bar.add_task("rows", total=None)
        rows = export_csv(cfg, table, output,
                          progress=lambda d, t: bar.update(task, completed=d, total=t))
    typer.echo(f"export {table}: {rows} rows written to {output}", err=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(source_app, name="source")
    app.command("import")(import_cmd)
    app.command("export")(export_cmd)
