"""What every dx command shares: loading the configuration and turning errors into one line."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from pipeline.config import DxConfig, load_config
from pipeline.errors import TerminalError
from pipeline.observability.server import HOST_ENV, PORT_ENV, WorkerServer

ConfigOption = typer.Option(
    Path("dx.yaml"), "--config", "-c", envvar="DX_CONFIG", help="path to dx.yaml"
)

# Off by default: several workers often share one host (a laptop, the demo, the tests) and a
# fixed default port would make the second one fail. The image sets DX_METRICS_PORT=9400, so
# every container serves it without a flag.
MetricsPortOption = typer.Option(
    0, "--metrics-port", envvar=PORT_ENV, min=0, max=65535,
    help="serve /metrics, /healthz and /readyz on this port (0: off; the image uses 9400)")
MetricsHostOption = typer.Option(
    "0.0.0.0", "--metrics-host", envvar=HOST_ENV,  # noqa: S104 - pods are scraped from outside
    help="address the metrics server listens on")


def config_from(path: Path | None) -> DxConfig:
    return load_config(path or Path(os.environ.get("DX_CONFIG", "dx.yaml")))


def worker_server(port: int, host: str) -> WorkerServer:
    """The worker's /metrics /healthz /readyz server; a port in use is one clear line."""
    try:
        return WorkerServer(port, host)
    except OSError as err:
        raise TerminalError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}"
                            f" (set --metrics-port / {PORT_ENV})") from None
