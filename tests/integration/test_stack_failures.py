"""deploy/local/stack fails with one clear line, never a traceback (issue 2's acceptance): a port
already taken, a failed download, a service that does not come up.

Each test runs the real script with its own DX_STACK_HOME under /tmp and free ports, never the
default ones (a stack other tests use may run there). Maven is sent to a closed local port
(DX_STACK_MAVEN_MIRROR) with an empty local repository, so downloads fail for real within seconds
and nothing touches the network or ~/.m2; PostgreSQL comes from the installed Debian binaries.
Whatever a test started is stopped with `deploy/local/stack down` and the same environment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

STACK = Path(__file__).resolve().parents[2] / "deploy" / "local" / "stack"
HOST = "127.0.0.1"
PORT_VARS = {
    "pg": "DX_STACK_PG_PORT",
    "kafka": "DX_STACK_KAFKA_PORT",
    "controller": "DX_STACK_KAFKA_CONTROLLER_PORT",
    "registry": "DX_STACK_REGISTRY_PORT",
    "registry_management": "DX_STACK_REGISTRY_MANAGEMENT_PORT",
}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class Sandbox:
    home: Path
    ports: dict[str, int]
    mirror: str  # a Maven repository URL nothing answers on
    env: dict[str, str]

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def up(self, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(STACK), "up"],
            env={**self.env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    # Not pytest's tmp_path: when run as root, PostgreSQL runs as `postgres`, which must be able
    # to enter the state directory, and /tmp/pytest-of-root is private.
    home = Path(tempfile.mkdtemp(prefix="dx-stack-failures-", dir="/tmp"))
    home.chmod(0o755)
    *service_ports, mirror_port = free_ports(len(PORT_VARS) + 1)
    ports = dict(zip(PORT_VARS, service_ports, strict=True))
    mirror = f"http://{HOST}:{mirror_port}/maven2"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DX_STACK_")}
    env.update({PORT_VARS[name]: str(port) for name, port in ports.items()})
    env.update(
        DX_STACK_HOME=str(home),
        DX_STACK_MAVEN_REPO=str(home / "m2"),
        DX_STACK_MAVEN_MIRROR=mirror,
        DX_STACK_QUIET="1",
    )
    box = Sandbox(home, ports, mirror, env)
    try:
        yield box
    finally:
        if any((home / "run").glob("*.pid")):
            down = subprocess.run(
                [str(STACK), "down"], env=env, capture_output=True, text=True, timeout=120
            )
            assert down.returncode == 0, down.stderr
        shutil.rmtree(home, ignore_errors=True)


def one_line(proc: subprocess.CompletedProcess[str], *expected: str) -> str:
    """The failure contract: exit 1, no traceback, stderr is one `dx-stack:` line with all of
    `expected` in it."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("dx-stack: "), line
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    return line


@contextlib.contextmanager
def holding(port: int, *, listen: bool = True) -> Iterator[None]:
    with socket.socket() as sock:
        sock.bind((HOST, port))
        if listen:
            sock.listen()
        yield


# --------------------------------------------------------------------------- a port already taken


@pytest.mark.parametrize(
    ("port_name", "service"),
    [
        ("pg", "postgres"),
        ("kafka", "kafka"),
        ("controller", "kafka"),
        ("registry", "registry"),
        ("registry_management", "registry"),
    ],
)
def test_port_taken_fails_before_anything_starts(
    sandbox: Sandbox, port_name: str, service: str
) -> None:
    port = sandbox.ports[port_name]
    with holding(port):
        proc = sandbox.up()
    line = one_line(proc, f"{service}:", f"{HOST}:{port}", PORT_VARS[port_name])
    assert "already in use" in line
    # Checked up front: no cluster created, nothing downloaded, nothing running.
    assert not (sandbox.home / "postgres").exists()
    assert not (sandbox.home / "kafka").exists()
    assert not any((sandbox.home / "run").glob("*.pid"))


def test_port_bound_but_not_listening_counts_as_taken(sandbox: Sandbox) -> None:
    port = sandbox.ports["pg"]
    with holding(port, listen=False):
        proc = sandbox.up()
    one_line(proc, "postgres:", f"{HOST}:{port}", "already in use", "DX_STACK_PG_PORT")
    assert not (sandbox.home / "postgres").exists()


# --------------------------------------------------------------------------- a failed download


def test_failed_download_names_service_repository_and_log(sandbox: Sandbox) -> None:
    proc = sandbox.up()
    log = sandbox.logs / "maven-kafka.log"
    line = one_line(proc, "kafka", "could not download from", sandbox.mirror, str(log))
    assert line.endswith(f"see {log}")
    # Maven really tried the (unreachable) repository and got nothing.
    assert sandbox.mirror in log.read_text()
    assert not list((sandbox.home / "kafka").glob("libs/*.jar"))


# --------------------------------------------------------------------------- not coming up


def test_service_not_ready_in_time_names_port_and_log(sandbox: Sandbox) -> None:
    port = sandbox.ports["pg"]
    proc = sandbox.up(DX_STACK_PG_TIMEOUT="0")
    log = sandbox.logs / "postgres.log"
    one_line(proc, "postgres did not answer", f"{HOST}:{port}", "within 0s", f"see {log}")


def test_service_exiting_during_startup_shows_its_reason_and_log(sandbox: Sandbox) -> None:
    # A broken data directory: PG_VERSION says initialised, nothing else is there.
    data = sandbox.home / "postgres" / "data"
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("15\n")
    proc = sandbox.up()
    log = sandbox.logs / "postgres.log"
    line = one_line(proc, "postgres exited during startup: ", f"see {log}")
    reason = line.split("postgres exited during startup: ", 1)[1].removesuffix(f"; see {log}")
    assert reason.strip(), line
    assert reason in log.read_text()
