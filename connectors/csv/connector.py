"""Rotating CSV files. Appends are synchronous and fsynced before a batch is reported delivered,
so a crash loses nothing that was acknowledged (a redelivered event may appear twice: use
``_event_id`` to de-duplicate). A batch that fails to write (disk full, quota) is cut off the
file again, so a retry never appends after half a row."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from connectors.base import Connector, Outcome, Record
from connectors.csv.configuration import CsvSettings
from pipeline.errors import TransientError

META = ("_event_id", "_op", "_ts_ms")


def _cell(v: Any) -> Any:
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"), default=str)
    if v is None:
        return ""
    return v


def _writer_alive(part: Path) -> bool:
    """Whether the process that writes ``part`` (its pid is in the name) still runs on this
    host: a second worker of the route starting on the same directory used to "finish" the
    first one's open file, so readers took a file that was still growing, and the first
    worker's rotation failed on the renamed file for ever. (Workers on different hosts
    sharing a directory need a ``prefix`` each.)"""
    try:
        pid = int(part.name.removesuffix(".csv.part").rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return False
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists (another user's)
    return True


class CsvConnector(Connector[CsvSettings]):
    settings_model = CsvSettings

    def __init__(self, settings: CsvSettings, *, route: str) -> None:
        super().__init__(settings, route=route)
        self.dir = Path(settings.directory)
        self.prefix = settings.prefix or route
        self.lock = threading.Lock()
        self.file: IO[str] | None = None
        self.path: Path | None = None
        self.header: list[str] | None = None
        self.opened_at = 0.0
        self.good = 0  # bytes of the current file known to end with a whole row
        self.seq = 0
        self.finished: list[Path] = []

    def open(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TransientError(f"cannot create {self.dir}: {err.strerror}") from None
        for stale in self.dir.glob(f"{self.prefix}-*.csv.part"):  # left by a crash: finish it
            if not _writer_alive(stale):
                stale.rename(stale.with_suffix(""))

    def close(self) -> None:
        with self.lock:
            self._finish()

    def _fields(self, r: Record) -> list[str]:
        if self.settings.columns:
            return list(self.settings.columns)
        return list((r.payload or {}).keys()) or list(r.key.keys())

    def _finish(self) -> None:
        if self.file is None or self.path is None:
            return
        file, path = self.file, self.path
        # forgotten first: a failed close or rename must not leave a closed file to write to
        # (every later batch failed on it, for ever); the .part is finished on the next open
        self.file = self.path = self.header = None
        file.close()
        final = path.with_suffix("")  # drop .part
        path.rename(final)
        self.finished.append(final)

    def _cut_back(self) -> None:
        """After a failed write: the current file back to its last whole row (what the failed
        batch buffered or half wrote is dropped: closing first, so nothing buffered is written
        after the cut), then open to append again. A file that cannot be cut stays ``.part``
        (finished on the next open) and the next batch starts a new one."""
        if self.file is None or self.path is None:
            return
        file, path, header, good = self.file, self.path, self.header, self.good
        self.file = self.path = self.header = None
        with contextlib.suppress(OSError, ValueError):
            file.close()
        try:
            if good == 0:  # not even the header is whole: start this file again
                path.unlink()
                return
            os.truncate(path, good)
            self.file = path.open("a", newline="", encoding="utf-8")
        except OSError:
            return
        self.path, self.header = path, header

    def _start(self, header: list[str]) -> None:
        self.seq += 1
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        self.path = self.dir / f"{self.prefix}-{stamp}-{os.getpid()}-{self.seq:05d}.csv.part"
        self.file = self.path.open("w", newline="", encoding="utf-8")
        self.header = header
        self.opened_at = time.monotonic()
        self.good = 0
        cols = [*META, *header] if self.settings.include_metadata else header
        csv.writer(self.file, delimiter=self.settings.delimiter).writerow(cols)

    def _rotate_due(self) -> bool:
        if self.file is None:
            return False
        s = self.settings
        if s.rotate_seconds is not None and time.monotonic() - self.opened_at >= s.rotate_seconds:
            return True
        return s.rotate_bytes is not None and self.file.tell() >= s.rotate_bytes

    def deliver(self, batch: Sequence[Record]) -> list[Outcome]:
        with self.lock:
            try:
                for r in batch:
                    fields = self._fields(r)
                    if self._rotate_due() or (self.header is not None and fields != self.header):
                        self._finish()
                    if self.file is None:
                        self._start(fields)
                    assert self.file is not None and self.header is not None
                    data = r.payload if r.payload is not None else r.key
                    row = [_cell(data.get(c)) for c in self.header]
                    if self.settings.include_metadata:
                        row = [r.event_id, r.op, r.ts_ms or "", *row]
                    csv.writer(self.file, delimiter=self.settings.delimiter).writerow(row)
                if self.file is not None:
                    self.file.flush()
                    if self.settings.fsync:
                        os.fsync(self.file.fileno())
                    self.good = self.file.tell()
                    written = str(self.path)
                    if self._rotate_due():
                        self._finish()
                else:
                    written = ""
            except OSError as err:
                self._cut_back()
                return [Outcome.failed(TransientError(f"csv write failed: {err.strerror}"))
                        ] * len(batch)
            return [Outcome(status=200, request=f"appended to {written}") for _ in batch]
