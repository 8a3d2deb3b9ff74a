"""CLI: ``dx sink run ROUTE``; ``dx tasks list|show|retry|skip|export|purge``; ``dx alerts``."""

from __future__ import annotations

import csv
import json
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli.common import (
    ConfigOption,
    MetricsHostOption,
    MetricsPortOption,
    config_from,
    worker_server,
)
from pipeline.cli.shutdown import graceful_shutdown
from pipeline.db import connection
from pipeline.errors import TerminalError
from pipeline.observability.logging import redact
from pipeline.tasks.store import STATUSES, FilterError, TaskFilter, TaskStore, ensure_schema

sink_app = typer.Typer(help="Outbound routes: deliver changes to third-party systems.",
                       no_args_is_help=True)
tasks_app = typer.Typer(help="Tasks: every event a route handled, with its logs.",
                        no_args_is_help=True)
alerts_app = typer.Typer(help="Alerts: failure rate, dead tasks, backlog age, consumer lag, "
                         "replication slot.",
                         no_args_is_help=True)


@sink_app.command("run")
def run(route: str = typer.Argument(..., help="sink route name (dx.yaml 'sinks:')"),
        config: Path = ConfigOption,
        stop_when_idle: float | None = typer.Option(
            None, "--stop-when-idle", envvar="DX_SINK_STOP_WHEN_IDLE",
            help="exit after this many seconds with nothing to do (batch jobs, tests)"),
        verbose: bool = typer.Option(False, "--verbose", "-v", envvar="DX_VERBOSE",
                                     help="log retries and dead tasks"),
        metrics_port: int = MetricsPortOption,
        metrics_host: str = MetricsHostOption) -> None:
    """Consume ROUTE's topics and deliver them through its connector. SIGTERM/Ctrl-C stops
    without committing undelivered offsets; a second signal exits at once."""
    from pipeline.sink.worker import SinkWorker

    if verbose:
        logging.getLogger("pipeline").setLevel(logging.INFO)
    cfg = config_from(config)
    server = worker_server(metrics_port, metrics_host)
    worker = SinkWorker(cfg, route, stop_when_idle_s=stop_when_idle, server=server)
    try:
        with graceful_shutdown(worker.stop.set, lambda: server.set_ready(False, "stopping")):
            stats = worker.run()
    finally:
        server.close()
    summary = ", ".join(f"{n} {s}" for s, n in sorted(stats.counts.items())) or "no events"
    typer.echo(f"route {route}: {summary}", err=True)


# -- tasks --------------------------------------------------------------------------------------

StatusOpt = typer.Option([], "--status", "-s", help=f"one of {', '.join(STATUSES)} (repeat)")
RouteOpt = typer.Option(None, "--route", "-r", help="route name")
KeyOpt = typer.Option(None, "--key", "-k",
                      help='entity key: {"id":42}, [42] or 42 (finds sink and source tasks)')
SinceOpt = typer.Option(None, "--since", help="age (30m, 2h, 1d) or ISO time")
UntilOpt = typer.Option(None, "--until", help="age (30m, 2h, 1d) or ISO time")
TextOpt = typer.Option(None, "--text", help="part of the error message (case-insensitive)")


def _filter(ids: list[int] | None, status: list[str], route: str | None, key: str | None,
            since: str | None, until: str | None, text: str | None,
            limit: int | None = None) -> TaskFilter:
    """The console's filter too (pipeline.tasks.store.TaskFilter): the same words select the
    same tasks on the page and here."""
    try:
        return TaskFilter(ids=ids or (), status=status, route=route, key=key, since=since,
                          until=until, text=text, limit=limit).check()
    except FilterError as err:
        raise TerminalError(str(err)) from None


def _store(config: Path) -> tuple[str, Any]:
    cfg = config_from(config)
    return cfg.database.url.get_secret_value(), cfg


def _short(text: Any, n: int = 60) -> str:
    s = "" if text is None else " ".join(str(text).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _ts(v: datetime | None) -> str:
    return "" if v is None else v.astimezone().strftime("%Y-%m-%d %H:%M:%S")


@tasks_app.command("list")
def tasks_list(status: list[str] = StatusOpt, route: str | None = RouteOpt,
               key: str | None = KeyOpt, since: str | None = SinceOpt,
               until: str | None = UntilOpt, text: str | None = TextOpt,
               limit: int = typer.Option(100, "--limit", "-n", help="at most this many"),
               as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
               config: Path = ConfigOption) -> None:
    """List tasks (oldest first) with their status and reason."""
    url, _ = _store(config)
    f = _filter(None, status, route, key, since, until, text, limit)
    with connection(url) as conn:
        ensure_schema(conn)
        rows = TaskStore(conn).find(f)
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r, default=str))
        return
    table = Table(title=f"{len(rows)} task(s)", show_lines=False)
    for col in ("id", "route", "status", "att", "key", "source", "updated", "reason"):
        table.add_column(col, overflow="fold" if col == "reason" else "ellipsis")
    style = {"dead": "red", "failed": "red", "retrying": "yellow", "pending": "yellow",
             "succeeded": "green", "skipped": "dim"}
    for r in rows:
        table.add_row(str(r["id"]), r["route"], f"[{style[r['status']]}]{r['status']}[/]",
                      str(r["attempts"]), _short(r["key"], 30),
                      f"{r['topic']}[{r['partition']}]@{r['offset']}", _ts(r["updated_at"]),
                      _short(r["error"], 80))
    Console().print(table)


@tasks_app.command("show")
def tasks_show(task_id: int = typer.Argument(..., help="task id"),
               config: Path = ConfigOption) -> None:
    """Everything about one task: import log (received, mapped) and export log (request,
    response)."""
    url, _ = _store(config)
    with connection(url) as conn:
        ensure_schema(conn)
        row = TaskStore(conn).get(task_id)
    if row is None:
        raise TerminalError(f"no task {task_id}")
    console = Console()
    for k in ("id", "route", "status", "attempts", "key", "event_id", "op"):
        console.print(f"[bold]{k:>10}[/] {row[k]}")
    console.print(f"[bold]{'source':>10}[/] {row['topic']}[{row['partition']}]@{row['offset']}")
    console.print(f"[bold]{'created':>10}[/] {_ts(row['created_at'])}   "
                  f"[bold]updated[/] {_ts(row['updated_at'])}")
    if row["error"]:
        console.print(f"[bold]{'reason':>10}[/] [red]{row['error']}[/]")
    if row["dlq"]:
        d = row["dlq"]
        console.print(f"[bold]{'dlq':>10}[/] {d.get('topic')}[{d.get('partition')}]@"
                      f"{d.get('offset')}")
    for name in ("import_log", "export_log"):
        if row[name]:
            console.rule(name.replace("_", " "))
            console.print_json(redact(json.dumps(row[name], default=str)))


def _ids_or_filter(ids: list[int] | None, all_matching: bool, status: list[str],
                   route: str | None, key: str | None, since: str | None,
                   until: str | None, text: str | None) -> TaskFilter:
    if not ids and not all_matching:
        raise TerminalError("give task ids, or --all with filters (--route, --status, --key, "
                            "--since, --until, --text)")
    if ids and all_matching:
        raise TerminalError("give task ids or --all, not both")
    return _filter(ids, status, route, key, since, until, text)


@tasks_app.command("retry")
def tasks_retry(ids: list[int] | None = typer.Argument(None, help="task ids"),
                all_matching: bool = typer.Option(False, "--all", help="every matching task"),
                status: list[str] = StatusOpt, route: str | None = RouteOpt,
                key: str | None = KeyOpt, since: str | None = SinceOpt,
                until: str | None = UntilOpt, text: str | None = TextOpt,
                config: Path = ConfigOption) -> None:
    """Queue dead/failed tasks for redelivery; the route's running worker redrives each key's
    tasks in order, then releases the events parked behind them."""
    url, _ = _store(config)
    f = _ids_or_filter(ids, all_matching, status, route, key, since, until, text)
    with connection(url) as conn:
        ensure_schema(conn)
        done = TaskStore(conn).retry(f)
    typer.echo(f"{len(done)} task(s) queued for redelivery"
               + (f": {', '.join(map(str, done[:20]))}{' …' if len(done) > 20 else ''}"
                  if done else " (only dead or failed tasks can be retried)"))


@tasks_app.command("skip")
def tasks_skip(ids: list[int] | None = typer.Argument(None, help="task ids"),
               all_matching: bool = typer.Option(False, "--all", help="every matching task"),
               status: list[str] = StatusOpt, route: str | None = RouteOpt,
               key: str | None = KeyOpt, since: str | None = SinceOpt,
               until: str | None = UntilOpt, text: str | None = TextOpt,
               config: Path = ConfigOption) -> None:
    """Give up on dead/failed/pending tasks; events parked behind them are then delivered."""
    url, _ = _store(config)
    f = _ids_or_filter(ids, all_matching, status, route, key, since, until, text)
    with connection(url) as conn:
        ensure_schema(conn)
        done = TaskStore(conn).skip(f)
    typer.echo(f"{len(done)} task(s) skipped")


EXPORT_COLUMNS = ("id", "route", "status", "attempts", "key", "event_id", "op", "topic",
                  "partition", "offset", "error", "http_status", "response", "created_at",
                  "updated_at")


@tasks_app.command("export")
def tasks_export(fmt: str = typer.Option("csv", "--format", help="csv or jsonl"),
                 output: Path | None = typer.Option(None, "--output", "-o",
                                                    help="file (default stdout)"),
                 status: list[str] = typer.Option(
                     ["dead", "failed"], "--status", "-s",
                     help="statuses to export (default the failures: dead, failed)"),
                 route: str | None = RouteOpt, key: str | None = KeyOpt,
                 since: str | None = SinceOpt, until: str | None = UntilOpt,
                 text: str | None = TextOpt,
                 config: Path = ConfigOption) -> None:
    """Export tasks (by default the failures, with their reasons) for people without access."""
    if fmt not in ("csv", "jsonl"):
        raise TerminalError("--format must be csv or jsonl")
    url, _ = _store(config)
    f = _filter(None, status, route, key, since, until, text)
    out = output.open("w", newline="", encoding="utf-8") if output else sys.stdout
    n = 0
    try:
        with connection(url) as conn:
            ensure_schema(conn)
            writer = csv.writer(out) if fmt == "csv" else None
            if writer is not None:
                writer.writerow(EXPORT_COLUMNS)
            for r in TaskStore(conn).iter_full(f):
                exp = r["export_log"] or {}
                values = {**r, "http_status": exp.get("status"), "response": exp.get("response")}
                # for people without access: no credential a target echoed back, ever
                values = {k: redact(v) if isinstance(v, str) else v for k, v in values.items()}
                if writer is not None:
                    writer.writerow(["" if values[c] is None else values[c]
                                     for c in EXPORT_COLUMNS])
                else:
                    out.write(json.dumps({c: values[c] for c in EXPORT_COLUMNS},
                                         default=str) + "\n")
                n += 1
    finally:
        if output:
            out.close()
    if output:
        typer.echo(f"{n} task(s) written to {output}", err=True)


@tasks_app.command("purge")
def tasks_purge(older_than: float = typer.Option(7, "--older-than-days",
                                                 help="age in days"),
                status: list[str] = typer.Option(["succeeded", "skipped"], "--status", "-s"),
                route: str | None = RouteOpt, config: Path = ConfigOption) -> None:
    """Delete old tasks (by default succeeded and skipped ones; workers also do this hourly
    with each route's log.retention_days)."""
    url, _ = _store(config)
    _filter(None, status, route, None, None, None, None)
    with connection(url) as conn:
        ensure_schema(conn)
        n = TaskStore(conn).purge(older_than_days=older_than, route=route, statuses=status)
    typer.echo(f"{n} task(s) purged")


# -- alerts -------------------------------------------------------------------------------------


@alerts_app.command("run")
def alerts_run(config: Path = ConfigOption,
               once: bool = typer.Option(False, "--once", help="evaluate once and exit")) -> None:
    """Evaluate the alert rules every ``alerts.interval_s`` and notify on incidents."""
    from pipeline.alerts.engine import AlertEngine

    cfg = config_from(config)
    engine = AlertEngine(cfg)
    if once:
        for line in engine.evaluate_once():
            typer.echo(line)
        return
    with graceful_shutdown(engine.stop.set):
        engine.run()


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(sink_app, name="sink")
    app.add_typer(tasks_app, name="tasks")
    app.add_typer(alerts_app, name="alerts")
