"""A PostgreSQL instance of the fault tier's own, so a test may restart or crash it (never the
shared stack's): Debian's PostgreSQL binaries, a temporary data directory, a free loopback port,
``wal_level=logical``. Run as the ``postgres`` user when the tests run as root (initdb refuses
root)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

PG_BIN = Path("/usr/lib/postgresql/15/bin")
USER, PASSWORD = "shop", "shop"  # not "dx": "$user" on the search path would be dx's schema


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnPostgres:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dx-faults-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._as:
            os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", USER,
                  f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8",
                  "--locale=C.UTF-8")
        pwfile.unlink()
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/postgres"

    def database(self, name: str) -> str:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def _run(self, *argv: str) -> None:
        subprocess.run([*self._as, *argv], check=True, capture_output=True, text=True,
                       timeout=120, cwd=self.root)

    def start(self) -> None:
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                "-c unix_socket_directories='' -c wal_level=logical -c max_connections=60 "
                "-c fsync=off -c shared_buffers=32MB -c max_wal_senders=4 "
                "-c max_replication_slots=4")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.root / "log"), "-o", opts, "-w", "-t", "60", "start")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                time.sleep(0.2)
        raise AssertionError("own PostgreSQL did not accept connections")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` (a clean restart) or ``immediate`` (a crash: recovery on the next start)."""
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
