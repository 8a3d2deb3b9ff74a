"""CLI: dx inbound serve | pull ROUTE | watch ROUTE (systems that do not speak Kafka)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

import typer

from pipeline.cli.common import (
    ConfigOption,
    MetricsHostOption,
    MetricsPortOption,
    config_from,
    worker_server,
)
from pipeline.cli.shutdown import graceful_shutdown, serve_uvicorn
from pipeline.errors import TerminalError
from pipeline.observability.logging import redact

inbound_app = typer.Typer(
    help="Inbound kinds feeding source routes: webhooks, scheduled pulls, file drops "
         "(dx.yaml sources[].inbound). 'dx source run ROUTE' applies what they receive.",
    no_args_is_help=True)


def _verbose(on: bool) -> None:
    if on:
        logging.getLogger("pipeline").setLevel(logging.INFO)


VerboseOption = typer.Option(False, "--verbose", "-v", envvar="DX_VERBOSE",
                             help="log every page, file and refused request")


@inbound_app.command("serve")
def serve(config: Path = ConfigOption,
          host: str = typer.Option("127.0.0.1", "--host", envvar="DX_INBOUND_HOST",
                                   help="listen address (0.0.0.0 to accept from outside)"),
          port: int = typer.Option(8088, "--port", envvar="DX_INBOUND_PORT", min=0,
                                   max=65535, help="listen port"),
          metrics_port: int = MetricsPortOption, metrics_host: str = MetricsHostOption,
          verbose: bool = VerboseOption) -> None:
    """Receive webhooks on POST /inbound/ROUTE for every route with 'inbound: webhook:'; a 2xx
    answer means Kafka acknowledged every entity. SIGTERM/Ctrl-C stop after in-flight requests.
    Prometheus /metrics on --metrics-port (not on the port facing the senders)."""
    import uvicorn

    from pipeline.inbound.webhook import WebhookServer

    _verbose(verbose)
    cfg = config_from(config)
    try:  # bound here: a port in use is one dx: error line (uvicorn would log and exit 3)
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host
                                    else socket.AF_INET)
    except OSError as err:
        why = os.strerror(err.errno) if err.errno else str(err)
        raise TerminalError(f"cannot listen on {host}:{port}: {why} (set --port / "
                            "DX_INBOUND_PORT)") from None
    metrics = worker_server(metrics_port, metrics_host)
    try:
        server = WebhookServer(cfg, server=metrics)
        typer.echo(f"dx inbound: webhooks for {', '.join(sorted(server.receivers))} on "
                   f"http://{host}:{port}/inbound/<route>", err=True)
        metrics.set_ready(True, "serving")
        try:
            serve_uvicorn(uvicorn.Config(server.app, host=host, port=port, log_config=None,
                                         access_log=False, server_header=False),
                          sockets=[sock], on_stop=(lambda: metrics.set_ready(False, "stopping"),))
        finally:
            server.close()
    finally:
        metrics.close()
        sock.close()
    typer.echo("dx inbound: stopped", err=True)


@inbound_app.command("pull")
def pull(route: str = typer.Argument(..., help="source route with 'inbound: pull:'"),
         config: Path = ConfigOption,
         once: bool = typer.Option(False, "--once", envvar="DX_INBOUND_ONCE",
                                   help="one run (every page since the cursor), then exit"),
         reset: bool = typer.Option(False, "--reset",
                                    help="forget the stored cursor first: read everything again"),
         metrics_port: int = MetricsPortOption, metrics_host: str = MetricsHostOption,
         verbose: bool = VerboseOption) -> None:
    """GET the route's endpoint every interval, page by page, from the stored cursor; each page
    is acknowledged by Kafka before the cursor moves (a crash re-reads at most one page)."""
    from pipeline.inbound.pull import Puller

    _verbose(verbose)
    stop = threading.Event()
    cfg = config_from(config)
    server = worker_server(metrics_port, metrics_host)
    try:
        puller = Puller(cfg, route, stop=stop, server=server)
        try:
            if reset:
                puller.reset()
            with graceful_shutdown(stop.set):
                stats = puller.run(once=once)
        finally:
            puller.close()
    finally:
        server.close()
    typer.echo(f"pull {route}: {stats.pages} pages, {stats.entities} entities sent, "
               f"{stats.failed} unmappable (dead tasks), {stats.retries} retried requests; "
               f"cursor {redact(stats.cursor or '')}", err=True)


@inbound_app.command("watch")
def watch(route: str = typer.Argument(..., help="source route with 'inbound: files:'"),
          config: Path = ConfigOption,
          once: bool = typer.Option(False, "--once", envvar="DX_INBOUND_ONCE",
                                    help="process the files that are ready, then exit"),
          metrics_port: int = MetricsPortOption, metrics_host: str = MetricsHostOption,
          verbose: bool = VerboseOption) -> None:
    """Pick up complete CSV / JSON-lines files from the route's folder, check them like 'dx
    import' and move them to done/ or failed/ (with FILE.rejects.csv). A file dropped twice is
    applied once."""
    from pipeline.inbound.files import Watcher

    _verbose(verbose)
    stop = threading.Event()
    cfg = config_from(config)
    server = worker_server(metrics_port, metrics_host)
    try:
        watcher = Watcher(cfg, route, stop=stop, server=server)
        try:
            with graceful_shutdown(stop.set):
                outcomes = watcher.run(once=once)
        finally:
            watcher.close()
    finally:
        server.close()
    for o in outcomes:
        typer.echo(f"watch {route}: {o.name}: {o.status}, {o.rows} rows, {o.rejected} rejected"
                   + (f" ({o.error})" if o.error else ""), err=True)
    failed = [o for o in outcomes if o.status == "failed"]
    if once and failed:
        raise TerminalError(f"{len(failed)} of {len(outcomes)} files failed: reasons in "
                            f"{watcher.dir / 'failed'} (FILE.rejects.csv, FILE.error.txt)")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(inbound_app, name="inbound")
