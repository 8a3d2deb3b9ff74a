"""The ``sql`` sink connector (SQLAlchemy Core) against SQLite and a real MariaDB server that the
test starts itself (Debian's ``mariadb-server``: ``./dev setup`` installs it) in a temporary
directory on a free loopback port: upserts and deletes in order, a bad record fails alone, a
misconfigured target stops with one line, and a real worker delivers through it."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from connectors.base import NOT_ATTEMPTED, Record
from connectors.sql.configuration import SqlSettings
from connectors.sql.connector import SqlConnector
from pipeline.errors import CatalogError
from tests.integration.test_sink_support import (
    EventProducer,
    create_topic,
    sink_thread,
    tasks,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

MARIADBD = "/usr/sbin/mariadbd"
DDL = ("CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(8) NOT NULL, "
       "behaviour VARCHAR(20), seq INT)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MariaDB server of our own; its URL (root, database ``target``)."""
    install = shutil.which("mariadb-install-db")
    if install is None or not Path(MARIADBD).exists():
        pytest.fail("mariadb-server is not installed: run ./dev setup (apt-get install "
                    "mariadb-server)")
    home = tmp_path_factory.mktemp("mariadb")
    subprocess.run([install, "--no-defaults", f"--datadir={home}/data", "--user=root",
                    "--auth-root-authentication-method=normal", "--skip-test-db"],
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    proc = subprocess.Popen([MARIADBD, "--no-defaults", f"--datadir={home}/data", "--user=root",
                             f"--port={port}", "--bind-address=127.0.0.1",
                             f"--socket={home}/sock", f"--pid-file={home}/pid",
                             "--skip-name-resolve", "--innodb-buffer-pool-size=16M",
                             f"--log-error={home}/error.log"])
    url = f"mysql+pymysql://root@127.0.0.1:{port}"
    try:
        engine = sa.create_engine(url)

        def up() -> bool:
            with contextlib.suppress(sa.exc.OperationalError), engine.connect() as c:
                c.execute(sa.text("CREATE DATABASE IF NOT EXISTS target"))
                return True
            return proc.poll() is not None

        wait_for(up, 60, interval=0.3, what="mariadbd to accept connections")
        assert proc.poll() is None, (home / "error.log").read_text()
        engine.dispose()
        yield f"{url}/target"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(params=["sqlite", "mariadb"])
def target_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    url = (f"sqlite:///{tmp_path}/target.db" if request.param == "sqlite"
           else request.getfixturevalue("mariadb"))
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("DROP TABLE IF EXISTS items"))
        c.execute(sa.text(DDL))
    engine.dispose()
    yield url


def rows(url: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return [tuple(r) for r in c.execute(sa.text(
                "SELECT id, name, seq FROM items ORDER BY id"))]
    finally:
        engine.dispose()


def rec(i: int, op: str = "u", name: str = "n", seq: int = 0) -> Record:
    payload = None if op == "d" else {"id": i, "name": name, "seq": seq}
    return Record(event_id=f"e{i}-{seq}", op=op, key={"id": i}, payload=payload, topic="t",
                  partition=0, offset=seq)


def connector(url: str, **kw: Any) -> SqlConnector:
    c = SqlConnector(SqlSettings.model_validate({"type": "sql", "url": url, "table": "items",
                                                 **kw}), route="r")
    c.open()
    return c


def test_upserts_and_deletes_in_order_and_a_bad_record_fails_alone(target_url: str) -> None:
    c = connector(target_url)
    try:
        outs = c.deliver([rec(1, seq=1), rec(2, seq=1), rec(1, name="b", seq=2),
                          rec(3, seq=1), rec(2, op="d", seq=2)])
        assert all(o.ok for o in outs)
        assert rows(target_url) == [(1, "b", 2), (3, "n", 1)]
        # a name too long for VARCHAR(8) (MariaDB strict mode) or a NULL name (both dialects)
        bad = Record(event_id="x", op="u", key={"id": 4}, payload={"id": 4, "name": None},
                     topic="t", partition=0, offset=9)
        outs = c.deliver([rec(5, seq=1), bad, rec(4, seq=2), rec(3, name="c", seq=3)])
        assert outs[0].ok and outs[3].ok
        assert outs[1].error is not None and not outs[1].error.transient
        assert outs[2].error is NOT_ATTEMPTED  # a later record of the refused key waits
        assert rows(target_url) == [(1, "b", 2), (3, "c", 3), (5, "n", 1)]
        unknown = c.deliver([Record(event_id="y", op="u", key={"id": 6},
                                    payload={"id": 6, "name": "x", "colour": "red"},
                                    topic="t", partition=0, offset=10)])
        assert "colour" in str(unknown[0].error) and not unknown[0].error.transient  # type: ignore[union-attr]
    finally:
        c.close()


def test_a_misconfigured_target_stops_with_one_line(target_url: str) -> None:
    with pytest.raises(CatalogError, match="target table nope does not exist"):
        SqlConnector(SqlSettings.model_validate({"type": "sql", "url": target_url,
                                                 "table": "nope"}), route="r").open()
    with pytest.raises(CatalogError, match="column 'sku' does not exist in items"):
        connector(target_url, key=["sku"])


def test_a_worker_delivers_through_the_sql_connector(
        target_url: str, stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path) -> None:
    topic = f"{topic_prefix}.public.products"
    create_topic(stack, topic)
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, f"""
  - name: to-sql
    topics: [{topic}]
    mapping: {{select: [id, name, behaviour, seq]}}
    connector: {{type: sql, url: "{target_url}", table: items}}
""")
    prod = EventProducer(stack, topic, topic_prefix)
    for seq in range(3):
        for k in range(1, 6):
            prod.send(k, seq=seq, name=f"k{k}s{seq}")
    prod.send(5, op="d", seq=3)
    prod.flush()
    with sink_thread(cfg, "to-sql"):
        wait_for(lambda: len(tasks(pg_db, "to-sql")) == 16
                 and {r["status"] for r in tasks(pg_db, "to-sql")} == {"succeeded"}, 60,
                 what="every event delivered")
    assert rows(target_url) == [(k, f"k{k}s2", 2) for k in range(1, 5)]
