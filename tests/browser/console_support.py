"""Helpers of the browser tests: the console served in a thread, the dx CLI, logging in."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("DX_CHROMIUM", "/usr/bin/chromium")
# This machine's network is closed: Chromium's background connections would hang or fail.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ConsoleServer:
    """``build_app`` served by uvicorn in a thread, on a free port."""

    def __init__(self, config_path: Path, tls: tuple[Path, Path] | None = None) -> None:
        import uvicorn

        from pipeline.config.loader import load_config
        from pipeline.console.app import build_app

        self.port = free_port()
        self.scheme = "https" if tls else "http"
        self.app = build_app(load_config(config_path))
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_config=None, access_log=False,
            ssl_certfile=str(tls[0]) if tls else None, ssl_keyfile=str(tls[1]) if tls else None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __enter__(self) -> ConsoleServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "console did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.app.state.pool.close()


def dx(config_path: Path, *args: str, password: str | None = None) -> str:
    """Run the real ``dx`` CLI (in this process: no interpreter start per call); returns its
    output, fails the test with the error."""
    from typer.testing import CliRunner

    from pipeline.cli.main import app

    env = {"DX_CONSOLE_PASSWORD": password} if password is not None else {}
    result = CliRunner().invoke(app, [*args, "-c", str(config_path)], env=env)
    assert result.exit_code == 0, f"dx {' '.join(args)}: {result.output} {result.exception!r}"
    return str(result.stdout)


def login(page: Any, base: str, name: str, password: str) -> None:
    page.goto(f"{base}/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_selector("#me")
