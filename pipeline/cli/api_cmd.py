"""CLI: dx api serve | check | openapi | hash-key (the Data Exchange API)."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import typer

from pipeline.cli.common import ConfigOption, config_from

api_app = typer.Typer(help="The Data Exchange API: REST over the entities in dx.yaml 'api:'.",
                      no_args_is_help=True)
log = logging.getLogger("pipeline.api")


def _path(config: Path | None) -> Path:
    import os

    return config or Path(os.environ.get("DX_CONFIG", "dx.yaml"))


@api_app.command("serve")
def serve(config: Path = ConfigOption,
          host: str | None = typer.Option(None, "--host", envvar="DX_API_HOST",
                                          help="listen address (default api.host)"),
          port: int | None = typer.Option(None, "--port", envvar="DX_API_PORT",
                                          help="listen port (default api.port)")) -> None:
    """Serve the API (uvicorn). SIGHUP re-reads dx.yaml without a restart (a refused file keeps
    the running API); SIGTERM/Ctrl-C stop after in-flight requests, a second signal exits now."""
    import uvicorn

    from pipeline.api.app import create_app
    from pipeline.cli.shutdown import serve_uvicorn

    api = create_app(_path(config))
    cfg = api.state.config

    def on_hup(signum: int, frame: FrameType | None) -> None:
        def run() -> None:
            try:
                api.reload()
            except Exception as err:
                log.error("reload refused, keeping the running API: %s", err)

        threading.Thread(target=run, name="dx-api-reload", daemon=True).start()

    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hup)
    bind_host, bind_port = host or cfg.api.host, port if port is not None else cfg.api.port
    typer.echo(f"dx api: {len(api.state.entities)} entities on http://{bind_host}:{bind_port} "
               "(docs at /docs)", err=True)

    try:
        serve_uvicorn(uvicorn.Config(api.app, host=bind_host, port=bind_port, log_config=None,
                                     access_log=False, server_header=False))
    finally:
        api.close()
    typer.echo("dx api: stopped", err=True)


@api_app.command("check")
def check(config: Path = ConfigOption) -> None:
    """Check the api: section against the database catalog and the key environment."""
    from pipeline.api.app import build_state

    state = build_state(config_from(config))
    for alias, e in state.entities.items():
        ops = ["GET", "PUT", "PATCH"] + (["POST"] if e.creatable else []) + (
            ["DELETE"] if e.delete else [])
        typer.echo(f"/{alias} -> {e.qualified}: {len(e.fields)} fields, key "
                   f"{','.join(e.key)}, {' '.join(ops)}"
                   + (f", relations {', '.join(e.relations)}" if e.relations else ""))
    typer.echo(f"api: ok ({len(state.entities)} entities, {len(state.keys)} keys, "
               f"{len(state.clients)} clients)")


@api_app.command("openapi")
def openapi(config: Path = ConfigOption) -> None:
    """Print the OpenAPI document generated from dx.yaml (needs the database catalog)."""
    from pipeline.api.app import build_state

    typer.echo(json.dumps(build_state(config_from(config)).openapi, indent=2))


@api_app.command("hash-key")
def hash_key() -> None:
    """Read an API key or client secret on stdin and print its SHA-256 (for
    api.keys[].secret_sha256 and api.clients[].secret_sha256)."""
    secret = sys.stdin.readline().rstrip("\r\n")
    if not secret:
        raise typer.BadParameter("no key on stdin")
    typer.echo(hashlib.sha256(secret.encode("utf-8")).hexdigest())


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(api_app, name="api")
