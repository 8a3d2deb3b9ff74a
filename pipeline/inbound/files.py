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

import codecs
import csv
import hashlib
import itertools
import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from pipeline import db
from pipeline.config.inbound import FilesConfig
from pipeline.config.model import DxConfig
from pipeline.csvio.importer import import_csv
from pipeline.errors import ConfigError, ServiceUnavailable, TerminalError
from pipeline.inbound import state
from pipeline.inbound.entities import Mapper, MappingError, canonical, loads_exact
from pipeline.inbound.produce import InboundProducer, OutMessage, read_route_target
from pipeline.inbound.rejects import rejected
from pipeline.observability.metrics import METRICS
from pipeline.observability.server import WorkerServer
from pipeline.source.events import Failure
from pipeline.source.tasks import recorder
from pipeline.source.validate import FieldError, RowValidator

log = logging.getLogger(__name__)

_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_TEMPORARY = (".tmp", ".part", ".partial", ".crdownload")
_SEND_CHUNK = 10_000
#: A JSON-lines line longer than this is rejected without being held in memory whole.
MAX_LINE_BYTES = 16 << 20


@dataclass
class FileOutcome:
    name: str
    status: str  # done, failed, duplicate, changed (written to while read: read again)
    rows: int = 0
    rejected: int = 0
    error: str | None = None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _identity(path: Path) -> tuple[int, int, int, int, int]:
    """What changes when a file is rewritten, appended to or replaced (not followed); the
    first item is the mode, so one ``lstat`` both checks the kind and identifies the file."""
    st = path.lstat()
    return st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _move(path: Path, folder: Path) -> Path:
    """Into ``folder``, never over an earlier file of the same name (``name.1``, ``name.2``)."""
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
        self.metrics = METRICS.worker("inbound", self.route.name)
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
                try:
                    outcomes.extend(self.scan())
                except psycopg.OperationalError as err:  # the database went away mid-scan
                    raise ServiceUnavailable("postgresql", db.redact(self.url),
                                             str(err).strip()) from None
                except OSError as err:  # the folder: permissions, a file where done/ should be
                    raise TerminalError(f"watch {self.route.name}: {err}") from None
            except (ServiceUnavailable, TerminalError) as err:
                self._record_error(err)
                if once:
                    raise
                log.error("watch %s: %s; files stay for the next scan", self.route.name, err)
            if once:
                break
            self.stop.wait(self.files.poll_s)
        self.server.set_ready(False, "stopped")
        return outcomes

    def _record_error(self, err: Exception) -> None:
        """A scan that failed is a problem in ``dx status`` (best effort: the database may be
        what failed)."""
        try:
            with self._db() as conn, conn.transaction():
                state.record(conn, self.route.name, "files", state.Counts(errors=1), ok=False,
                             error=str(err))
        except (ServiceUnavailable, psycopg.Error) as failed:
            log.debug("watch %s: error not recorded: %s", self.route.name, failed)

    def ready(self) -> list[Path]:
        """Complete files of an accepted format, oldest first."""
        found = []
        for p in self.dir.iterdir():
            name = p.name
            if not (p.is_symlink() or p.is_file()) or name.startswith(".") \
                    or name.lower().endswith(_TEMPORARY):
                continue
            kind = _EXTENSIONS.get(p.suffix.lower())
            if kind is None or kind not in self.files.formats:
                continue
            if self.files.complete == "marker" and not p.with_name(name + ".done").exists():
                continue
            try:
                found.append((p.lstat().st_mtime, p))
            except FileNotFoundError:  # taken away meanwhile
                continue
        return [p for _, p in sorted(found, key=lambda t: (t[0], t[1].name))]

    def scan(self) -> list[FileOutcome]:
        out = []
        for p in self.ready():
            if self.stop.is_set():
                break
            out.append(self.process(p))
            self.server.heartbeat()
        return out

    # ---- one file ---------------------------------------------------------------------------

    def _folder(self, name: str) -> Path:
        """``done/`` or ``failed/``: a real folder, never a symbolic link someone planted to
        make dx move files (or write reports) elsewhere."""
        folder = self.dir / name
        if folder.is_symlink():
            raise TerminalError(f"{folder} is a symbolic link: dx moves dropped files only into "
                                "a real folder (remove the link)")
        folder.mkdir(exist_ok=True)
        return folder

    def process(self, path: Path) -> FileOutcome:
        before = _identity(path)  # the same lstat decides "a link?" and what is read next
        if not stat.S_ISREG(before[0]):  # a link: reading it sends whatever it points to
            return self._conclude(path, None, FileOutcome(
                path.name, "failed", error="not a regular file (a symbolic link is not "
                "followed): drop the file itself"),
                0, None)
        digest = sha256_of(path)
        with self._db() as conn:
            # a file that could not be read at all sent nothing: the same content dropped again
            # (after fixing the route, the permissions) is read again, not a "duplicate"
            row = conn.execute("SELECT status, processed_at FROM dx.inbound_file "
                               "WHERE route = %s AND sha256 = %s AND NOT (status = 'failed' "
                               "AND error IS NOT NULL)", (self.route.name, digest)).fetchone()
        if row is not None:
            log.warning("watch %s: %s has the content of a file processed on %s (%s); "
                        "nothing sent", self.route.name, path.name, row[1], row[0])
            self._finish(path, self._folder("done"))
            return FileOutcome(path.name, "duplicate")
        # reports are written in a private folder and moved into failed/ at the end: a link
        # planted as failed/FILE.rejects.csv is replaced, never written through
        work = Path(tempfile.mkdtemp(prefix=".dx-", dir=self._folder("failed")))
        try:
            rejects = work / "rejects.csv"
            try:
                if path.suffix.lower() == ".csv":
                    result = import_csv(self.config, path, entity=self.route.name,
                                        reject_file=rejects)
                    outcome = FileOutcome(path.name, "failed" if result.rejected else "done",
                                          result.rows, result.rejected)
                    sent = result.produced  # dx import's own producer: counted here
                    self.metrics.received(self.route.topic, sent)
                    self.metrics.delivered(self.route.topic, sent)
                else:
                    outcome, sent = self._jsonl(path, rejects)
            except (TerminalError, OSError, UnicodeDecodeError, csv.Error) as err:
                outcome, sent = FileOutcome(path.name, "failed", error=str(err)), 0
            if _identity(path) != before:
                # what was read is not what was hashed: recording the hash would make the
                # content hashed look processed (a later drop of it "duplicate", never applied)
                log.warning("watch %s: %s changed while it was read; it is read again on the "
                            "next scan (write files under a temporary name, then rename)",
                            self.route.name, path.name)
                return FileOutcome(path.name, "changed", outcome.rows, outcome.rejected)
            return self._conclude(path, digest, outcome, sent, rejects)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _conclude(self, path: Path, digest: str | None, outcome: FileOutcome, sent: int,
                  rejects: Path | None) -> FileOutcome:
        """Store the outcome (dead tasks, the hash, the counters) in one transaction, put the
        reports into failed/ and move the file to done/ or failed/."""
        failures = self._reject_tasks(path.name, rejects, outcome)
        with self._db() as conn, conn.transaction():
            recorder().record(conn, self.route.name, failures)
            if digest is not None:
                conn.execute("INSERT INTO dx.inbound_file (route, sha256, name, status, rows, "
                             "rejected, error) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                             "ON CONFLICT (route, sha256) DO UPDATE SET name = EXCLUDED.name, "
                             "status = EXCLUDED.status, rows = EXCLUDED.rows, rejected = "
                             "EXCLUDED.rejected, error = EXCLUDED.error, processed_at = now()",
                             (self.route.name, digest, path.name, outcome.status, outcome.rows,
                              outcome.rejected, outcome.error))
            state.record(conn, self.route.name, "files", state.Counts(
                entities=sent, files_done=int(outcome.status == "done"),
                files_failed=int(outcome.status == "failed"),
                errors=int(outcome.error is not None)), ok=outcome.error is None,
                error=f"{path.name}: {outcome.error}" if outcome.error else None)
        if failures:  # refused before Kafka: dead tasks
            self.metrics.failed("terminal", len(failures))
        failed = self._folder("failed")
        if outcome.error is not None:
            _publish(failed / f"{path.name}.error.txt", f"{outcome.error}\n".encode())
        elif rejects is not None and rejects.exists():
            os.replace(rejects, failed / f"{path.name}.rejects.csv")
        self._finish(path, self._folder(outcome.status))
        log.log(logging.INFO if outcome.status == "done" else logging.ERROR,
                "watch %s: %s %s: %d rows, %d rejected%s", self.route.name, path.name,
                outcome.status, outcome.rows, outcome.rejected,
                f" ({outcome.error})" if outcome.error else "")
        return outcome

    def _reject_tasks(self, name: str, rejects: Path | None, outcome: FileOutcome
                      ) -> list[Failure]:
        """A dead task per rejected line (read back from the reject file, whichever format
        wrote it: line, field, reason, then the line's cells or text), or one for a file that
        could not be read."""
        route, topic = self.route.name, self.route.topic
        if outcome.error is not None:
            return [rejected(route, topic, name.encode(), {"kind": "file", "file": name},
                             f"file {name}: {outcome.error}")]
        if not outcome.rejected or rejects is None or not rejects.exists():
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
            for line, text, problem in _lines(path):
                outcome.rows += 1
                try:
                    if problem is not None:
                        raise FieldError(None, problem)
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
            value = loads_exact(text)
        except ValueError as err:
            raise FieldError(None, f"not JSON: {err}") from None
        if not isinstance(value, dict):
            raise FieldError(None, f"expected a JSON object, got {type(value).__name__}")
        try:
            return self.mapper(value)
        except MappingError as err:
            raise FieldError(None, str(err)) from None


def _publish(dest: Path, data: bytes) -> None:
    """Write ``dest`` by renaming a new file over it (a planted link is replaced, not
    followed)."""
    fd, tmp = tempfile.mkstemp(prefix=".dx-", dir=dest.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)


def _lines(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """(line number, text, problem) of every non-blank line. A line that is not UTF-8 or is
    longer than :data:`MAX_LINE_BYTES` is a problem of that line alone (rejected with its
    number), not of the file; a long line is skipped without being held in memory."""
    with path.open("rb") as f:
        for n in itertools.count(1):
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if n == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            problem = None
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (more := f.readline(1 << 20)) and not more.endswith(b"\n"):
                    pass
                problem = f"the line is longer than {MAX_LINE_BYTES} bytes"
                raw = raw[:200]
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                text = raw.decode("utf-8", "replace").strip()
                problem = problem or f"not UTF-8 (byte {err.start} of the line)"
            if text or problem:
                yield n, text, problem
