"""CLI: ``dx console serve | user add|passwd|remove|list | token add|revoke`` (the operator
console), and ``dx sink|source pause|resume ROUTE``."""

from __future__ import annotations

import getpass
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import typer

from pipeline.cli.common import ConfigOption, config_from
from pipeline.config import DxConfig
from pipeline.db import connection
from pipeline.errors import TerminalError

console_app = typer.Typer(help="The operator console: a web page and JSON API for tasks, "
                               "routes and audit.", no_args_is_help=True)
user_app = typer.Typer(help="Console operators (viewer, operator, admin).",
                       no_args_is_help=True)
token_app = typer.Typer(help="Bearer tokens for scripts using the console's JSON API.",
                        no_args_is_help=True)
console_app.add_typer(user_app, name="user")
console_app.add_typer(token_app, name="token")

HOST_ENV, PORT_ENV = "DX_CONSOLE_HOST", "DX_CONSOLE_PORT"
PASSWORD_ENV = "DX_CONSOLE_PASSWORD"  # noqa: S105 - a variable name


def _url(cfg: DxConfig) -> str:
    return cfg.database.url.get_secret_value()


def _ready(cfg: DxConfig) -> None:
    """Create the console's and the pause tables (like ``dx init`` does for everything)."""
    from pipeline.api.managed import ensure_schema as api_entity_schema
    from pipeline.console.schema import ensure_schema
    from pipeline.routes.pause import ensure_schema as pause_schema
    from pipeline.tasks.store import ensure_schema as tasks_schema

    with connection(_url(cfg)) as conn:
        for ensure in (tasks_schema, pause_schema, ensure_schema, api_entity_schema):
            ensure(conn)
        conn.commit()


@console_app.command("serve")
def serve(config: Path = ConfigOption,
          host: str = typer.Option("127.0.0.1", "--host", envvar=HOST_ENV,
                                   help="listen address (0.0.0.0 in a container)"),
          port: int = typer.Option(8091, "--port", envvar=PORT_ENV, min=0, max=65535,
                                   help="listen port"),
          tls_cert: Path | None = typer.Option(None, "--tls-cert", envvar="DX_CONSOLE_TLS_CERT",
                                               help="serve HTTPS with this certificate (PEM)"),
          tls_key: Path | None = typer.Option(None, "--tls-key", envvar="DX_CONSOLE_TLS_KEY",
                                              help="the certificate's private key (PEM)"),
          forwarded_allow_ips: str = typer.Option(
              "127.0.0.1", "--forwarded-allow-ips", envvar="DX_CONSOLE_FORWARDED_ALLOW_IPS",
              help="proxies trusted for X-Forwarded-Proto (cookies are Secure behind TLS)"),
          ) -> None:
    """Serve the console (pages, /api/v1, /metrics, /healthz, /readyz). SIGTERM/Ctrl-C stop
    after in-flight requests; a second signal exits now."""
    import uvicorn

    from pipeline.cli.shutdown import serve_uvicorn
    from pipeline.console.app import build_app

    if bool(tls_cert) != bool(tls_key):
        raise TerminalError("give both --tls-cert and --tls-key, or neither")
    cfg = config_from(config)
    _ready(cfg)
    app = build_app(cfg)
    scheme = "https" if tls_cert else "http"
    typer.echo(f"dx console: {scheme}://{host}:{port}/ (API docs at /api/docs)", err=True)
    serve_uvicorn(uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, server_header=False,
        proxy_headers=True, forwarded_allow_ips=forwarded_allow_ips,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None))


@contextmanager
def _console_db(config: Path) -> Iterator[psycopg.Connection[Any]]:
    """A connection to the configured database with the console's tables ready; commits when
    the block succeeds."""
    cfg = config_from(config)
    _ready(cfg)
    with connection(_url(cfg)) as conn:
        yield conn
        conn.commit()


def _password(confirm: bool = True) -> str:
    """From DX_CONSOLE_PASSWORD (scripts, the demo), else asked without echo."""
    env = os.environ.get(PASSWORD_ENV)
    if env:
        return env
    first = getpass.getpass("password: ")
    if confirm and getpass.getpass("again: ") != first:
        raise TerminalError("the passwords differ")
    return first


@user_app.command("add")
def user_add(name: str = typer.Argument(..., help="user name"),
             role: str = typer.Option("viewer", "--role", help="viewer, operator or admin"),
             config: Path = ConfigOption) -> None:
    """Add an operator (password from DX_CONSOLE_PASSWORD or asked)."""
    from pipeline.console import accounts

    accounts.check_role(role)
    with _console_db(config) as conn:
        accounts.add_user(conn, name, role, _password())
    typer.echo(f"user {name} added ({role})")


@user_app.command("passwd")
def user_passwd(name: str = typer.Argument(..., help="user name"),
                role: str | None = typer.Option(None, "--role", help="also change the role"),
                config: Path = ConfigOption) -> None:
    """Set a new password (and role); the user's sessions end."""
    from pipeline.console import accounts

    with _console_db(config) as conn:
        accounts.set_password(conn, name, _password(), role)
    typer.echo(f"user {name} updated; their sessions ended")


@user_app.command("remove")
def user_remove(name: str = typer.Argument(..., help="user name"),
                config: Path = ConfigOption) -> None:
    """Remove an operator (their sessions end)."""
    from pipeline.console import accounts

    with _console_db(config) as conn:
        accounts.remove_user(conn, name)
    typer.echo(f"user {name} removed")


@user_app.command("list")
def user_list(config: Path = ConfigOption) -> None:
    """Operators and their roles."""
    from pipeline.console import accounts

    with _console_db(config) as conn:
        for name, role in accounts.users(conn):
            typer.echo(f"{name}\t{role}")


@token_app.command("add")
def token_add(name: str = typer.Argument(..., help="token name (who uses it)"),
              role: str = typer.Option("viewer", "--role", help="viewer, operator or admin"),
              config: Path = ConfigOption) -> None:
    """Create a bearer token; its secret is printed once (only a hash is stored)."""
    from pipeline.console import accounts

    with _console_db(config) as conn:
        secret = accounts.add_token(conn, name, role, created_by=f"cli:{getpass.getuser()}")
    typer.echo(secret)
    typer.echo(f"token {name} ({role}): shown once, store it now", err=True)


@token_app.command("revoke")
def token_revoke(name: str = typer.Argument(..., help="token name"),
                 config: Path = ConfigOption) -> None:
    from pipeline.console import accounts

    with _console_db(config) as conn:
        accounts.revoke_token(conn, name)
    typer.echo(f"token {name} revoked")


# -- dx sink|source pause|resume ----------------------------------------------------------------


def _pause(kind: str, route: str, paused: bool, config: Path) -> None:
    from pipeline.console.accounts import Principal
    from pipeline.console.actions import pause_route

    cfg = config_from(config)
    names = {r.name for r in (cfg.sinks if kind == "sink" else cfg.sources)}
    if route not in names:
        raise TerminalError(f"no {kind} route {route!r} in {config} "
                            f"(routes: {', '.join(sorted(names)) or 'none'})")
    _ready(cfg)
    who = Principal(f"cli:{getpass.getuser()}", "admin", "session")  # audited by that name
    with connection(_url(cfg)) as conn:
        changed = pause_route(conn, who, cfg, "sink" if kind == "sink" else "source", route,
                              paused)
    state = "paused" if paused else "resumed"
    typer.echo(f"{kind} route {route} {state}" + ("" if changed else " already")
               + (" (running workers stop consuming within seconds and keep their place)"
                  if paused and changed else ""))


def _pause_commands(app: typer.Typer, kind: str) -> None:
    @app.command("pause")
    def pause(route: str = typer.Argument(..., help=f"{kind} route name"),
              config: Path = ConfigOption) -> None:
        """Pause a route: its workers stop consuming within seconds and keep their place."""
        _pause(kind, route, True, config)

    @app.command("resume")
    def resume(route: str = typer.Argument(..., help=f"{kind} route name"),
               config: Path = ConfigOption) -> None:
        """Resume a paused route where it stopped."""
        _pause(kind, route, False, config)


def register(app: typer.Typer) -> None:
    """Add ``dx console`` and the pause/resume commands of ``dx sink`` and ``dx source``."""
    from pipeline.cli.sink_cmd import sink_app
    from pipeline.cli.source_cmd import source_app

    _pause_commands(sink_app, "sink")
    _pause_commands(source_app, "source")
    app.add_typer(console_app, name="console")
