"""Restarts a dx worker whenever it exits, the way a Kubernetes Deployment would, and keeps the
last line each run printed to stderr (dx's one-line error, or nothing)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path


class Supervisor:
    def __init__(self, *args: str, log: Path | None = None) -> None:
        """``log``: keep every run's stderr in that file (what a worker said while a fault
        lasted), not only each run's last line."""
        self.argv = [sys.executable, "-m", "pipeline.cli", *args]
        self.log = log
        self.done = threading.Event()
        self.exits: list[tuple[int, str]] = []
        self.proc: subprocess.Popen[str] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            if self.log is None:
                self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True)
                _, err = self.proc.communicate()
            else:
                with self.log.open("a") as out:
                    start = out.tell()
                    self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                                 stderr=out, text=True)
                    self.proc.wait()
                with self.log.open() as run:
                    run.seek(start)
                    err = run.read()
            lines = err.strip().splitlines()
            self.exits.append((self.proc.returncode, lines[-1] if lines else ""))
            self.done.wait(0.5)

    def stop(self) -> None:
        self.done.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.thread.join(60)
