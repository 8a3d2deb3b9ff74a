"""The csv connector: complete files only (.part until finished), rotation, metadata columns."""

from __future__ import annotations

import csv
from pathlib import Path

from connectors.base import Record
from connectors.csv.configuration import CsvSettings
from connectors.csv.connector import CsvConnector


def rec(i: int, **payload: object) -> Record:
    return Record(event_id=f"e{i}", op="c", key={"id": i}, payload={"id": i, **payload},
                  topic="t", partition=0, offset=i, ts_ms=1000 + i)


def make(tmp_path: Path, **kw: object) -> CsvConnector:
    c = CsvConnector(CsvSettings.model_validate({"type": "csv", "directory": str(tmp_path),
                                                 **kw}), route="export")
    c.open()
    return c


def read(p: Path) -> list[list[str]]:
    with p.open(newline="") as f:
        return list(csv.reader(f))


def test_rows_land_in_a_part_file_until_rotation_then_in_a_finished_file(tmp_path: Path) -> None:
    c = make(tmp_path, rotate_bytes=1024)
    assert all(o.ok for o in c.deliver([rec(i, name=f"n{i}", tags=["a"]) for i in range(3)]))
    assert [p.suffix for p in tmp_path.iterdir()] == [".part"]
    for start in range(3, 200, 10):
        c.deliver([rec(i, name="x" * 20, tags=[]) for i in range(start, start + 10)])
    c.close()
    files = sorted(tmp_path.glob("export-*.csv"))
    assert len(files) > 1 and not list(tmp_path.glob("*.part"))
    rows = [r for f in files for r in read(f)[1:]]
    assert [int(r[3]) for r in rows] == list(range(3)) + list(range(3, 203))
    first = read(files[0])
    assert first[0] == ["_event_id", "_op", "_ts_ms", "id", "name", "tags"]
    assert first[1] == ["e0", "c", "1000", "0", "n0", '["a"]']
    assert all(f.stat().st_size < 1024 + 200 for f in files[:-1])


def test_other_fields_start_a_new_file_and_fixed_columns_do_not(tmp_path: Path) -> None:
    c = make(tmp_path, include_metadata=False)
    c.deliver([rec(1, a=1), rec(2, b=2)])
    c.close()
    headers = sorted(read(f)[0] for f in tmp_path.glob("*.csv"))
    assert headers == [["id", "a"], ["id", "b"]]
    d = tmp_path / "fixed"
    c = make(d, include_metadata=False, columns=["id", "b"])
    c.deliver([rec(1, a=1), rec(2, b=2)])
    c.close()
    (only,) = d.glob("*.csv")
    assert read(only) == [["id", "b"], ["1", ""], ["2", "2"]]


def test_a_part_file_left_by_a_crash_is_finished_on_open(tmp_path: Path) -> None:
    pid = finished_pid()  # the writer that crashed
    (tmp_path / f"export-20240101T000000-{pid}-00001.csv.part").write_text("id\n1\n")
    make(tmp_path).close()
    assert [p.name for p in tmp_path.iterdir()] == [f"export-20240101T000000-{pid}-00001.csv"]


def finished_pid() -> int:
    """The pid of a process that ran and is gone."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_a_batch_that_fails_to_write_leaves_no_half_row_behind(tmp_path: Path) -> None:
    """Review: a write failing mid-batch (disk full, a quota) left half a row in the file; the
    retry appended after it, merging two rows into one broken line. The file is cut back to
    its last whole row. The failure is real: a file size limit (RLIMIT_FSIZE) makes the
    kernel refuse the write (EFBIG)."""
    import resource
    import signal

    c = make(tmp_path)
    assert all(o.ok for o in c.deliver([rec(i, name="a" * 50) for i in range(3)]))
    assert c.path is not None
    size = c.path.stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))
    try:
        failed = c.deliver([rec(i, name="b" * 5000) for i in range(3, 6)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert [o.ok for o in failed] == [False] * 3
    assert "csv write failed" in str(failed[0].error)
    assert all(o.ok for o in c.deliver([rec(i, name="b" * 5000) for i in range(3, 6)]))
    c.close()
    (done,) = tmp_path.glob("export-*.csv")
    rows = read(done)
    assert [r[3] for r in rows[1:]] == [str(i) for i in range(6)]
    assert all(len(r) == len(rows[0]) for r in rows)


def test_a_second_worker_leaves_the_open_file_of_a_running_one_alone(tmp_path: Path) -> None:
    """Review: a second worker of the route starting on the same directory renamed the first
    one's ``.part`` file as if a crash had left it: readers took a file still being written,
    and the first worker's next rotation failed for ever. A ``.part`` whose writer (the pid
    in its name) still runs is left alone; one of a process that is gone is finished."""
    import subprocess
    import sys

    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / f"export-20240101T000000-{running.pid}-00001.csv.part"
        dead = tmp_path / f"export-20240101T000000-{finished_pid()}-00001.csv.part"
        for p in (alive, dead):
            p.write_text("id\n1\n")
        make(tmp_path).close()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [alive.name, dead.name.removesuffix(".part")])
    finally:
        running.kill()
        running.wait()


def test_a_file_that_cannot_be_finished_does_not_stall_the_route(tmp_path: Path) -> None:
    """Review: when finishing a file failed (its ``.part`` renamed away by someone else), the
    connector kept the closed file and failed every later batch for ever."""
    c = make(tmp_path)
    assert all(o.ok for o in c.deliver([rec(1, name="a")]))
    assert c.path is not None
    c.path.rename(tmp_path / "taken-away.csv")
    failed = c.deliver([rec(2, colour="red")])  # other fields: the file is finished first
    assert not failed[0].ok and failed[0].error is not None and failed[0].error.transient
    assert all(o.ok for o in c.deliver([rec(2, colour="red")]))
    c.close()
    (done,) = tmp_path.glob("export-*.csv")
    assert [r[3:] for r in read(done)] == [["id", "colour"], ["2", "red"]]
