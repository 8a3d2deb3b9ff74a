"""``dx inbound watch ROUTE``: CSV and JSON-lines files dropped in a folder.

A file is read only once it is complete: under ``complete: rename`` writers create it under a
temporary name (``.tmp``/``.part`` suffix or a leading dot) and rename it when done (a rename is
atomic); under ``complete: marker`` ``FILE`` is read once ``FILE.done`` exists. Then:

* its SHA-256 is looked up in ``dx.inbound_file``: a file already processed (the same content
  dropped again) is moved to ``done/`` without sending anything;
* CSV goes through ``dx import`` itself (``pipeline.csvio.importer.import_csv``: header check,
  every row validated, a reject file with line numbers and reasons); JSON-lines (one object a
  line, mapped by ``inbound.mapping``) through the same validator with the same reject file;
* good rows are produced and acknowledged by Kafka, the outcome is stored, and the file moves to
  ``done/`` — or to ``failed/`` beside ``FILE.rejects.csv`` (some rows rejected) or
  ``FILE.error.txt`` (the file could not be read at all).

Kafka unreachable leaves the file where it is for the next scan (nothing is lost, nothing is
recorded as processed). A crash after the outcome was stored but before the move finds the hash
on the next scan and only moves the file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import db
from pipeline.config.inbound import FilesConfig
from pipeline.config.model import DxConfig
from pipeline.csvio.importer import import_csv
from pipeline.errors import ConfigError, ServiceUnavailable, TerminalError
from pipeline.inbound import state
from pipeline.inbound.entities import Mapper, MappingError, canonical
from pipeline.inbound.produce import InboundProducer, OutMessage, read_route_target
from pipeline.inbound.rejects import rejected
from pipeline.observability.server import WorkerServer
from pipeline.source.events import Failure
from pipeline.source.tasks import recorder
from pipeline.source.validate import FieldError, RowValidator

log = logging.getLogger(__name__)

_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_TEMPORARY = (".tmp", ".part", ".partial", ".crdownload")
_SEND_CHUNK = 10_000


@dataclass
class FileOutcome:
    name: str
    status: str  # done, failed, duplicate
    rows: int = 0
    rejected: int = 0
    error: str | None = None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _move(path: Path, folder: Path) -> Path:
    """Into ``folder``, never over an earlier file of the same name (``name.1``, ``name.2``)."""
    folder.mkdir(exist_ok=True)
    dest = folder / path.name
    n = 0
    while dest.exists():
        n += 1
        dest = folder / f"{path.name}.{n}"
    path.rename(dest)
    return dest


class Watcher:
    """One route's watched folder (see module docstring)."""

    def __init__(self, config: DxConfig, route_name: str, *,
                 stop: threading.Event | None = None,
                 server: WorkerServer | None = None) -> None:
        self.config = config
        self.server = server if server is not None else WorkerServer(0)
        index, self.route, self.target = read_route_target(config, route_name)
        inbound = self.route.inbound
        if inbound is None or inbound.files is None:
            file, line = config.where("sources", index)
            raise ConfigError(f"route {route_name} has no 'inbound: files:'", file=file,
                              line=line)
        self.files: FilesConfig = inbound.files
        self.dir = Path(self.files.directory)
        if not self.dir.is_dir():
            file, line = config.where("sources", index, "inbound", "files", "directory")
            raise ConfigError(f"inbound.files.directory {self.dir} is not a directory",
                              file=file, line=line)
        self.mapper = Mapper(self.route.name, inbound)
        self.stop = stop or threading.Event()
        self.url = config.database.url.get_secret_value()
        self.producer: InboundProducer | None = None
        with self._db() as conn:
            state.ensure_schema(conn)

    def _db(self) -> Any:
        return db.connection(self.url, application_name=f"dx-inbound-watch-{self.route.name}",
                             connect_timeout_s=self.config.database.connect_timeout_s)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()

    def run(self, *, once: bool = False) -> list[FileOutcome]:
        """Scan every ``poll_s`` until stopped (``once``: one scan)."""
        outcomes: list[FileOutcome] = []
        self.server.set_ready(True, f"watching {self.dir}")
        while not self.stop.is_set():
            self.server.heartbeat()
            try:
                outcomes.extend(self.scan())
            except ServiceUnavailable as err:
                if once:
                    raise
                log.error("watch %s: %s; files stay for the next scan", self.route.name, err)
            if once:
                break
            self.stop.wait(self.files.poll_s)
        self.server.set_ready(False, "stopped")
        return outcomes

    def ready(self) -> list[Path]:
        """Complete files of an accepted format, oldest first."""
        found = []
        for p in self.dir.iterdir():
            name = p.name
            if not p.is_file() or name.startswith(".") or name.lower().endswith(_TEMPORARY):
                continue
            kind = _EXTENSIONS.get(p.suffix.lower())
            if kind is None or kind not in self.files.formats:
                continue
            if self.files.complete == "marker" and not p.with_name(name + ".done").exists():
                continue
            found.append(p)
        return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))

    def scan(self) -> list[FileOutcome]:
        out = []
        for p in self.ready():
            if self.stop.is_set():
                break
            out.append(self.process(p))
            self.server.heartbeat()
        return out

    # ---- one file ---------------------------------------------------------------------------

    def process(self, path: Path) -> FileOutcome:
        digest = sha256_of(path)
        with self._db() as conn:
            row = conn.execute("SELECT status, processed_at FROM dx.inbound_file "
                               "WHERE route = %s AND sha256 = %s",
                               (self.route.name, digest)).fetchone()
        if row is not None:
            log.warning("watch %s: %s has the content of a file processed on %s (%s); "
                        "nothing sent", self.route.name, path.name, row[1], row[0])
            self._finish(path, self.dir / "done")
            return FileOutcome(path.name, "duplicate")
        failed = self.dir / "failed"
        failed.mkdir(exist_ok=True)
        rejects = failed / f"{path.name}.rejects.csv"
        try:
            if path.suffix.lower() == ".csv":
                result = import_csv(self.config, path, entity=self.route.name,
                                    reject_file=rejects)
                outcome = FileOutcome(path.name, "failed" if result.rejected else "done",
                                      result.rows, result.rejected)
                sent = result.produced
            else:
                outcome, sent = self._jsonl(path, rejects)
        except ServiceUnavailable:
            rejects.unlink(missing_ok=True)
            raise
        except (TerminalError, OSError, UnicodeDecodeError, csv.Error) as err:
            outcome, sent = FileOutcome(path.name, "failed", error=str(err)), 0
            (failed / f"{path.name}.error.txt").write_text(f"{err}\n", encoding="utf-8")
        failures = self._reject_tasks(path.name, rejects, outcome)
        with self._db() as conn, conn.transaction():
            recorder().record(conn, self.route.name, failures)
            conn.execute("INSERT INTO dx.inbound_file (route, sha256, name, status, rows, "
                         "rejected, error) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                         "ON CONFLICT DO NOTHING",
                         (self.route.name, digest, path.name, outcome.status, outcome.rows,
                          outcome.rejected, outcome.error))
            state.record(conn, self.route.name, "files", state.Counts(
                entities=sent, files_done=int(outcome.status == "done"),
                files_failed=int(outcome.status == "failed"),
                errors=int(outcome.error is not None)), ok=outcome.error is None,
                error=f"{path.name}: {outcome.error}" if outcome.error else None)
        self._finish(path, self.dir / outcome.status)
        log.log(logging.INFO if outcome.status == "done" else logging.ERROR,
                "watch %s: %s %s: %d rows, %d rejected%s", self.route.name, path.name,
                outcome.status, outcome.rows, outcome.rejected,
                f" ({outcome.error})" if outcome.error else "")
        return outcome

    def _reject_tasks(self, name: str, rejects: Path, outcome: FileOutcome) -> list[Failure]:
        """A dead task per rejected line (read back from the reject file, whichever format
        wrote it: line, field, reason, then the line's cells or text), or one for a file that
        could not be read."""
        route, topic = self.route.name, self.route.topic
        if outcome.error is not None:
            return [rejected(route, topic, name.encode(), {"kind": "file", "file": name},
                             f"file {name}: {outcome.error}")]
        if not outcome.rejected or not rejects.exists():
            return []
        out = []
        with rejects.open(newline="", encoding="utf-8") as f:
            rows = csv.reader(f)
            header = next(rows)[3:]
            for line, field, reason, *cells in rows:
                raw = cells[0] if header == ["record"] else canonical(
                    dict(zip(header, cells, strict=False)))
                out.append(rejected(route, topic, raw.encode(),
                                    {"kind": "file", "file": name, "line": line},
                                    f"{reason} (file {name} line {line})", field or None))
        return out

    def _finish(self, path: Path, folder: Path) -> None:
        _move(path, folder)
        path.with_name(path.name + ".done").unlink(missing_ok=True)

    def _jsonl(self, path: Path, rejects: Path) -> tuple[FileOutcome, int]:
        """One JSON object a line; bad lines to the reject file, good ones to Kafka."""
        if self.producer is None:
            self.producer = InboundProducer(self.config, self.route, self.target,
                                            ack_timeout_s=self.files.ack_timeout_s)
        validator = RowValidator(self.route, self.target)
        outcome = FileOutcome(path.name, "done")
        writer: Any = None
        out = None
        batch: list[OutMessage] = []
        sent = 0
        try:
            for line, text in _lines(path):
                outcome.rows += 1
                try:
                    record = self._record(text)
                    validator.row(record)
                except FieldError as err:
                    outcome.rejected += 1
                    if writer is None:
                        out = rejects.open("w", newline="", encoding="utf-8")
                        writer = csv.writer(out)
                        writer.writerow(["line", "field", "reason", "record"])
                    writer.writerow([line, err.field or "", err.reason, text])
                    continue
                batch.append(self.producer.message(record, {"kind": "file", "file": path.name,
                                                            "line": line}))
                if len(batch) >= _SEND_CHUNK:
                    sent += self.producer.send(batch)
                    batch = []
            sent += self.producer.send(batch)
        finally:
            if out is not None:
                out.close()
        if outcome.rejected:
            outcome.status = "failed"
        return outcome, sent

    def _record(self, text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except ValueError as err:
            raise FieldError(None, f"not JSON: {err}") from None
        if not isinstance(value, dict):
            raise FieldError(None, f"expected a JSON object, got {type(value).__name__}")
        try:
            return self.mapper(value)
        except MappingError as err:
            raise FieldError(None, str(err)) from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8-sig") as f:
        for n, text in enumerate(f, start=1):
            if text.strip():
                yield n, text.strip()
