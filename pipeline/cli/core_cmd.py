"""CLI: dx init, validate, capture, relay, snapshot, schemas, status."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.capture import install as capture_install
from pipeline.capture import logical
from pipeline.capture.catalog import read_all
from pipeline.capture.snapshot import installed_spec, snapshot_table
from pipeline.cli.common import (
    ConfigOption,
    MetricsHostOption,
    MetricsPortOption,
    config_from,
    worker_server,
)
from pipeline.cli.shutdown import graceful_shutdown
from pipeline.config import DxConfig
from pipeline.db import connection
from pipeline.errors import CatalogError, ConfigError
from pipeline.tasks.query import EXACT_UP_TO

console = Console(stderr=False)
capture_app = typer.Typer(help="Install, remove and inspect capture triggers.",
                          no_args_is_help=True)


def _db(cfg: DxConfig) -> Any:
    """A connection in autocommit, so each ``conn.transaction()`` block in the capture code is a
    real transaction that commits when it ends (not a savepoint in an implicit one)."""
    return connection(cfg.database.url.get_secret_value(), autocommit=True,
                      connect_timeout_s=cfg.database.connect_timeout_s)


def _index(cfg: DxConfig, table: str) -> int:
    try:
        return cfg.tables.index(cfg.table(table))
    except KeyError as err:
        raise ConfigError(str(err.args[0]), file=cfg.where()[0]) from None


def init(config: Path = ConfigOption) -> None:
    """Create dx's own tables (schema dx) in the database. Safe to run again."""
    cfg = config_from(config)
    with _db(cfg) as conn:
        capture_install.ensure_schema(conn, cfg)
        for ensure in _extra_schemas():
            ensure(conn)
        conn.commit()
    typer.echo("dx: schema dx is ready")


def _extra_schemas() -> list[Any]:
    """ensure_schema() of every other area: tasks, inbound offsets, alert incidents, inbound
    state, route pauses, the console, console-managed API entities and keys."""
    from pipeline.alerts.engine import ensure_schema as alerts_schema
    from pipeline.api.managed import ensure_schema as api_entity_schema
    from pipeline.console.schema import ensure_schema as console_schema
    from pipeline.inbound.state import ensure_schema as inbound_schema
    from pipeline.routes.pause import ensure_schema as pause_schema
    from pipeline.source.offsets import ensure_schema as offsets_schema
    from pipeline.tasks.store import ensure_schema as tasks_schema

    # dx init is the upgrade path: it builds an index a new version adds (CONCURRENTLY)
    return [partial(tasks_schema, build_indexes=True), offsets_schema, alerts_schema,
            inbound_schema, pause_schema, console_schema, api_entity_schema]


def validate(config: Path = ConfigOption,
             offline: bool = typer.Option(False, help="skip the check against the database")
             ) -> None:
    """Check dx.yaml; with a reachable database also every table and column in the catalog."""
    cfg = config_from(config)
    if not offline:
        with _db(cfg) as conn:
            read_all(conn, cfg)
    typer.echo(f"{config}: ok ({len(cfg.tables)} tables, {len(cfg.sinks)} sinks, "
               f"{len(cfg.sources)} sources)")


@capture_app.command("install")
def capture_install_cmd(config: Path = ConfigOption,
                        table: list[str] = typer.Option([], "--table", "-t",
                                                        help="only these tables"),
                        offline: bool = typer.Option(
                            False, help="skip the schema compatibility check against the "
                                        "registry")) -> None:
    """Install (or update) capture triggers on the configured tables.

    A changed table (a column added to ``columns``, a type change) gets a new spec version; its
    schemas are checked against the registry first, so an incompatible change is refused here
    and never reaches the outbox. The running relay picks the new version up by itself."""
    from pipeline.capture.catalog import read_table
    from pipeline.events.contracts import require_compatible

    cfg = config_from(config)
    with _db(cfg) as conn:
        capture_install.ensure_schema(conn, cfg)
        indexes = [_index(cfg, t) for t in table] if table else range(len(cfg.tables))
        if not offline:
            registrar = _registrar(cfg)
            registrar.check_reachable()
            for i in indexes:
                require_compatible(read_table(conn, cfg, i), cfg.kafka.topic_prefix, registrar)
        mode, why = logical.resolve_mode(conn, cfg)
        typer.echo(f"capture mode: {mode} ({why})")
        for i in indexes:
            if mode == "logical":
                spec, version = logical.install_table(conn, cfg, i)
                typer.echo(f"captured {spec.entity} -> {spec.topic} (logical, schema "
                           f"v{version}, {len(spec.columns)} columns)")
                continue
            spec, version, kind = capture_install.install_table(conn, cfg, i)
            typer.echo(f"captured {spec.entity} -> {spec.topic} ({kind} trigger, "
                       f"schema v{version}, {len(spec.columns)} columns)")
        if mode == "logical":
            if logical.slot_info(conn) is None:
                typer.echo("creating the replication slot (PostgreSQL waits for the "
                           "transactions running now to finish)")
            slot, created = logical.ensure_slot(conn)
            typer.echo(f"replication slot {slot} {'created' if created else 'in place'}")
        elif logical.drop_slot(conn):
            typer.echo("replication slot dropped (no table is captured logically any more)")


@capture_app.command("uninstall")
def capture_uninstall_cmd(config: Path = ConfigOption,
                          table: list[str] = typer.Option([], "--table", "-t")) -> None:
    """Remove capture triggers (pending outbox rows stay and are still relayed)."""
    cfg = config_from(config)
    with _db(cfg) as conn:
        indexes = [_index(cfg, t) for t in table] if table else range(len(cfg.tables))
        for i in indexes:
            spec = capture_install.uninstall_table(conn, cfg, i)
            typer.echo(f"removed capture from {spec.entity}")
        if logical.drop_slot(conn):
            typer.echo("replication slot dropped (no table is captured logically any more)")


@capture_app.command("status")
def capture_status_cmd(config: Path = ConfigOption) -> None:
    """Which tables are captured, how, and whether the triggers match dx.yaml and the catalog."""
    cfg = config_from(config)
    table = Table("table", "installed", "mode", "schema", "up to date", "pending")
    drift = False
    problems: list[str] = []
    with _db(cfg) as conn:
        try:
            mode, why = logical.resolve_mode(conn, cfg)
            typer.echo(f"capture mode: {mode} ({why})")
        except CatalogError as err:
            typer.echo(str(err))
        slot = logical.slot_info(conn) if logical.installed_mode(conn) == "logical" else None
        if slot is not None:
            typer.echo(f"replication slot {slot.name}: "
                       f"{'active' if slot.active else 'inactive'}, {slot.wal_status}, "
                       f"retains {slot.retained_bytes or 0} bytes of WAL")
        for i in range(len(cfg.tables)):
            st = capture_install.table_state(conn, cfg, i)
            drift |= not (st.installed and st.current) or bool(st.warnings)
            problems += [f"{st.entity}: {p}" for p in (*st.problems, *st.warnings)]
            table.add_row(st.entity, "yes" if st.installed else "NO", st.mode or "-",
                          f"v{st.version}" if st.version else "-",
                          "yes" if st.current else "NO (run dx capture install)",
                          str(st.pending))
        # dx's own commit triggers: without them no captured change is ever published
        dx_own = [t.problem() for t in capture_install.inactive_triggers(conn)
                  if t.schema == "dx"]
        drift |= bool(dx_own)
        problems += dx_own
    console.print(table)
    for line in problems:
        typer.echo(line)
    if drift:
        raise typer.Exit(1)


def snapshot(table: str = typer.Argument(..., help="configured table, e.g. public.products"),
             config: Path = ConfigOption,
             chunk: int = typer.Option(5000, min=1, help="rows per transaction"),
             restart: bool = typer.Option(False, help="start over instead of resuming")) -> None:
    """Initial load / backfill: emit every row as an op=r event, resumable, with progress."""
    cfg = config_from(config)
    index = _index(cfg, table)
    with _db(cfg) as conn:
        installed_spec(conn, cfg, index)  # refuse before drawing a progress bar
        with Progress(
            TextColumn("[bold]snapshot {task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=Console(stderr=True), transient=False,
        ) as bar:
            task = bar.add_task(table, total=None)
            done = snapshot_table(conn, cfg, index, chunk=chunk, restart=restart,
                                  progress=lambda d, t: bar.update(task, completed=d, total=t))
            bar.update(task, completed=done, total=done)
    typer.echo(f"snapshot of {table}: {done} rows queued for the relay")


def relay(config: Path = ConfigOption, metrics_port: int = MetricsPortOption,
          metrics_host: str = MetricsHostOption,
          reset_state: bool = typer.Option(
              False, "--reset-state",
              help="forget the stored cursor and publish every pending outbox row (after a "
                   "database restore or fail-over; the relay refuses to start and says so)"),
          ) -> None:
    """Move committed changes from the outbox to Kafka (standby if another relay is active)."""
    from pipeline.relay.observe import RelayObserver
    from pipeline.relay.runner import Relay

    cfg = config_from(config)
    server = worker_server(metrics_port, metrics_host)
    observer = RelayObserver(cfg, server)
    last = {"state": ""}

    def on_state(state: str) -> None:
        if state != last["state"]:
            print(f"dx relay {cfg.relay.name}: {state}", flush=True)
            last["state"] = state

    try:
        with graceful_shutdown(lambda: server.set_ready(False, "stopping")) as stop:
            Relay(cfg, stop=stop, on_state=on_state, hooks=observer,
                  reset_state=reset_state).run()
    finally:
        observer.close()
        server.close()


def status(config: Path = ConfigOption,
           as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
           long_txn_s: float = typer.Option(
               60.0, "--long-txn-s", min=0,
               help="unhealthy: a transaction holding captured changes open this long"),
           backlog_age_s: float = typer.Option(
               300.0, "--backlog-age-s", min=0,
               help="unhealthy: the oldest committed change not relayed after this long"),
           max_lag: int = typer.Option(
               10_000, "--max-lag", min=0,
               help="unhealthy: a route this many messages behind (any lag without a running "
                    "worker is unhealthy too)"),
           max_dead: int = typer.Option(0, "--max-dead", min=0,
                                        help="unhealthy: a route with more dead tasks"),
           kafka_timeout_s: float = typer.Option(5.0, "--kafka-timeout-s", min=0.1,
                                                 help="per Kafka request"),
           ) -> None:
    """Outbox backlog, relay, long transactions, consumer lag and tasks of every route, dead
    letters; exit 1 when something needs attention."""
    from pipeline.status import Thresholds, collect

    cfg = config_from(config)
    limits = Thresholds(long_txn_s=long_txn_s, backlog_age_s=backlog_age_s, max_lag=max_lag,
                        max_dead=max_dead, kafka_timeout_s=kafka_timeout_s)
    with _db(cfg) as conn:
        st = collect(conn, cfg, limits)
    if as_json:
        typer.echo(json.dumps(st.to_json(), indent=2))
    else:
        _print_status(st)
    if not st.healthy:
        raise typer.Exit(1)


def _print_status(st: Any) -> None:
    from pipeline.status import STATUS_ORDER, age_text

    r = st.relay
    t = Table("outbox and relay", "value", title="dx status")
    t.add_row("backlog (rows)", str(r.backlog))
    t.add_row("committed, not yet relayed", str(r.committed_not_relayed))
    t.add_row("oldest pending", age_text(r.oldest_pending_age_s))
    t.add_row("relay active", r.relay_active or "none")
    t.add_row("relay standbys", str(r.relay_standbys))
    t.add_row("last delivery", age_text(r.last_delivery_age_s) + " ago"
              if r.last_delivery_age_s is not None else "-")
    t.add_row("capture mode", r.capture_mode)
    if r.slot is not None:
        t.add_row("slot", f"{r.slot['name']} ({'active' if r.slot['active'] else 'inactive'}, "
                          f"{r.slot['wal_status']})")
        t.add_row("slot retains (bytes)", str(r.slot["retained_bytes"]))
        t.add_row("slot last confirmed", age_text(r.slot["confirmed_age_s"]) + " ago"
                  if r.slot["confirmed_age_s"] is not None else "-")
    console.print(t)
    if st.routes:
        short = {"pending": "pend", "retrying": "retry", "failed": "fail",
                 "succeeded": "ok", "skipped": "skip", "dead": "dead"}
        rt = Table("route", "kind", "lag", "workers", *(short[s] for s in STATUS_ORDER),
                   title="routes (lag in messages, tasks by status; ≈ estimated "
                         f"past {EXACT_UP_TO:,})")
        for route in st.routes:
            lag = ("-" if route.note else "?") if route.lag is None else str(route.lag)
            dead = route.tasks.get("dead", 0)
            rt.add_row(route.name, route.kind,
                       f"[red]{lag}[/red]" if route.lag else lag,
                       "?" if route.members is None else str(route.members),
                       *[("≈" if s in route.estimated else "") + str(route.tasks.get(s, 0))
                         for s in STATUS_ORDER[:-1]],
                       f"[red]{dead}[/red]" if dead else "0")
        console.print(rt)
        _print_incoming(st.routes)
        for route in st.routes:
            if route.note:
                console.print(f"route {route.name}: {route.note}", highlight=False)
            if route.paused:
                console.print(f"route {route.name}: [yellow]paused[/yellow] "
                              f"('dx {route.kind} resume {route.name}')", highlight=False)
    if r.open_transactions:
        lt = Table("pid", "age", "state", "application", "captured changes", "query",
                   title="long transactions")
        for o in r.open_transactions:
            lt.add_row(str(o.pid), age_text(o.age_s), o.state, o.application,
                       "[red]yes[/red]" if o.holds_captured_changes else "no", o.query[:60])
        console.print(lt)
    for p in st.problems:
        console.print(f"[red]problem:[/red] {p}", highlight=False)
    if st.healthy:
        console.print("[green]healthy[/green]")


def _print_incoming(routes: list[Any]) -> None:
    """The inbound kinds of source routes (webhooks, pulls, file drops), when any ran."""
    from pipeline.status import age_text

    kinds = [(r.name, i) for r in routes for i in r.incoming]
    if not kinds:
        return
    t = Table("route", "kind", "last run", "pages", "requests", "entities", "refused",
              "files ok/failed", "errors", "since", title="incoming (dx inbound)")
    for name, i in kinds:
        last = age_text(i.last_run_age_s) + " ago" if i.last_run_age_s is not None else "-"
        since = json.loads(i.cursor).get("since") if i.cursor else None
        t.add_row(name, i.kind, f"[red]{last}[/red]" if i.failing else last, str(i.pages),
                  str(i.requests), str(i.entities), str(i.refused),
                  f"{i.files_done}/{i.files_failed}", str(i.errors), str(since or "-")[:32])
    console.print(t)


schemas_app = typer.Typer(help="Generate, check and register the Avro contracts.",
                          no_args_is_help=True)
SchemaDir = typer.Option(Path("avro_schemas"), "--dir", envvar="DX_SCHEMA_DIR",
                         help="where the reviewed .avsc files live")


def _registrar(cfg: DxConfig) -> Any:
    from pipeline.events.wire import SchemaRegistrar, registry_client

    sr = cfg.schema_registry
    return SchemaRegistrar(registry_client(sr), sr.url)


@schemas_app.command("generate")
def schemas_generate(config: Path = ConfigOption, directory: Path = SchemaDir) -> None:
    """Write .avsc files for every configured table from the live catalog."""
    from pipeline.events import contracts

    cfg = config_from(config)
    with _db(cfg) as conn:
        specs = read_all(conn, cfg)
    written = contracts.generate(specs, cfg.kafka.topic_prefix, directory)
    for p in written:
        typer.echo(f"wrote {p}")
    typer.echo(f"{len(written)} file(s) changed in {directory}")


@schemas_app.command("check")
def schemas_check(config: Path = ConfigOption, directory: Path = SchemaDir,
                  offline: bool = typer.Option(False, help="skip the registry check")) -> None:
    """Diff the files against the catalog and test them against the registry; exit 1 if off."""
    from pipeline.events import contracts

    cfg = config_from(config)
    with _db(cfg) as conn:
        specs = read_all(conn, cfg)
    bad = False
    for r in contracts.check(specs, cfg.kafka.topic_prefix, directory,
                             None if offline else _registrar(cfg)):
        if r.diff:
            bad = True
            typer.echo(r.diff)
        if r.compatible is False:
            bad = True
            typer.echo(f"{r.subject}: NOT compatible with the registered schema", err=True)
        else:
            state = ("shared shape, not a subject of its own" if r.subject.startswith("dx.")
                     else "registry not checked" if offline
                     else "new subject" if r.compatible is None else "compatible")
            typer.echo(f"{r.subject}: {'differs from catalog' if r.diff else 'up to date'}, "
                       f"{state}")
    if bad:
        raise typer.Exit(1)


@schemas_app.command("register")
def schemas_register(config: Path = ConfigOption, directory: Path = SchemaDir) -> None:
    """Register the reviewed files (compatibility is checked first)."""
    from pipeline.events import contracts

    cfg = config_from(config)
    for subject, schema_id in contracts.register(directory, _registrar(cfg)):
        typer.echo(f"{subject}: schema id {schema_id}")


def config_reference(
    readme: Path | None = typer.Option(None, "--update", help="rewrite the generated section "
                                       "of this Markdown file (e.g. README.md) in place"),
) -> None:
    """Print the dx.yaml reference (Markdown) generated from the configuration model."""
    from pipeline.config.reference import reference, update_readme

    if readme is None:
        typer.echo(reference())
    else:
        changed = update_readme(readme)
        typer.echo(f"{readme}: {'updated' if changed else 'already current'}")


def register(app: typer.Typer) -> None:
    app.command("config-reference")(config_reference)
    app.command()(init)
    app.command()(validate)
    app.add_typer(capture_app, name="capture")
    app.command()(snapshot)
    app.command()(relay)
    app.command()(status)
    app.add_typer(schemas_app, name="schemas")
