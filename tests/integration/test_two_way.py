"""Two-way acceptance: the demo shop database and a real HTTP PIM (``deploy/demo/pim.py``)
exchange product edits through real ``dx`` processes (relay, sink, source) on the real stack.

Edits are made on both sides, interleaved, several on the same products. The checks:

* every shop edit reached the PIM over HTTP; every PIM edit reached the database or lost, by the
  version rule, to a newer shop edit (recorded as a skipped source task, never silently);
* nothing comes back to where it started: the PIM receives none of its own edits (its delivery
  log), the database applies nothing it originated (the inbound topic holds only the PIM's
  messages, each PIM edit appears at most once on the change topic with origin ``pim``, and the
  sink skipped exactly those as echoes);
* once everything is processed, both sides hold the same value for every product.

Also: the demo script (``deploy/demo/run.py``, the README's ``./dev demo``) runs end to end
against the test stack with its own database and prefix, and ``run.py stop`` ends its processes.

No mocks and no sleeps as assertions: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
from relay_support import DEMO, load_demo_shop, render_demo_config

REPO = Path(__file__).resolve().parents[2]
FIELDS = ("id", "sku", "name", "description", "category", "status", "weight_g", "version")
SINK, SOURCE = "pim-products", "pim-inbound"
TOKEN = "test-token"
PRODUCTS = 2000  # rows deploy/demo/shop.sql seeds


# -- plumbing --------------------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60,
             alive: Callable[[], None] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=15) as resp:
        return json.loads(resp.read())


def dx(config: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "-c", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, f"dx {' '.join(args)}: {done.stderr.strip()[-2000:]}"
    return done.stdout


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 15) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(f"  {self.name}| {line}" for line in lines[-n:])


@dataclass
class Exchange:
    """The running exchange: the shop database, the PIM, the dx processes."""

    db_url: str
    config: Path
    pim_url: str
    prefix: str
    stack: Any
    procs: list[Proc] = field(default_factory=list)

    @property
    def products_topic(self) -> str:
        return f"{self.prefix}.public.products"

    @property
    def inbound_topic(self) -> str:
        return f"{self.prefix}.pim.products"

    def start(self, name: str, argv: list[str], tmp: Path) -> None:
        log = tmp / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                env={**os.environ, "DX_LOG_LEVEL": "INFO", "DX_LOG_FORMAT": "text",
                     "DX_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1"})
        self.procs.append(Proc(name, popen, log))

    def alive(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                raise AssertionError(f"{p.name} exited with {p.popen.returncode}:\n{p.tail()}")

    def stop(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.popen.wait(30)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(10)

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    # -- the two sides --

    def pim(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return http(self.pim_url + path, body)

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


@pytest.fixture
def exchange(stack: Any, pg_db: str, topic_prefix: str, tmp_path: Path,
             capture_mode: str) -> Iterator[Exchange]:
    """Shop database loaded and captured (in each capture mode), products snapshotted, the
    PIM and the three dx workers running as subprocesses, exactly as the demo wires them."""
    load_demo_shop(pg_db)
    port = free_port()
    config = render_demo_config(tmp_path / "dx.yaml", {
        "DX_DEMO_DATABASE_URL": pg_db, "DX_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "DX_SCHEMA_REGISTRY_URL": stack.schema_registry_url, "DX_DEMO_PREFIX": topic_prefix,
        "DX_PIM_URL": f"http://127.0.0.1:{port}", "DX_PIM_TOKEN": TOKEN})
    config.write_text(config.read_text().replace("capture:\n  mode: row",
                                                 f"capture:\n  mode: {capture_mode}"))
    ex = Exchange(pg_db, config, f"http://127.0.0.1:{port}", topic_prefix, stack)
    dx(config, "init")
    dx(config, "capture", "install", "--table", "public.products")
    dx(config, "snapshot", "public.products")
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    for fut in admin.create_topics([NewTopic(ex.inbound_topic, 1, 1)]).values():
        fut.result(30)
    with ExitStack() as cleanup:
        cleanup.callback(ex.stop)
        ex.start("pim", [sys.executable, str(DEMO / "pim.py"), "--port", str(port),
                         "--topic", ex.inbound_topic, "--token", TOKEN,
                         "--kafka-bootstrap", stack.kafka_bootstrap], tmp_path)
        cli = [sys.executable, "-m", "pipeline.cli"]
        ex.start("relay", [*cli, "relay", "-c", str(config)], tmp_path)
        wait_for(f"topic {ex.products_topic}",
                 lambda: ex.products_topic in admin.list_topics(timeout=5).topics, 60, ex.alive)
        ex.start("sink", [*cli, "sink", "run", SINK, "-c", str(config)], tmp_path)
        ex.start("source", [*cli, "source", "run", SOURCE, "-c", str(config)], tmp_path)
        cleanup.callback(lambda: print(ex.logs()))  # shown by pytest when the test fails
        yield ex


# -- reading what happened --------------------------------------------------------------------


def read_all(stack: Any, topic: str, *, avro: bool) -> list[tuple[int, Any, dict[str, bytes]]]:
    """Every data message of a one-partition topic up to its end: (offset, value, headers)."""
    consumer = Consumer({"bootstrap.servers": stack.kafka_bootstrap,
                         "group.id": f"t-read-{time.time_ns()}", "enable.auto.commit": False,
                         "isolation.level": "read_committed", "enable.partition.eof": True})
    decode = AvroDeserializer(SchemaRegistryClient({"url": stack.schema_registry_url}))
    out: list[tuple[int, Any, dict[str, bytes]]] = []
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    return out
                raise AssertionError(str(msg.error()))
            if msg.value() is None:
                continue
            value = (decode(msg.value(), SerializationContext(topic, MessageField.VALUE))
                     if avro else json.loads(msg.value()))
            out.append((msg.offset(), value, dict(msg.headers() or [])))
    finally:
        consumer.close()
    raise AssertionError(f"could not read {topic} to its end")


def quiescent(ex: Exchange, inbound_end: int) -> bool:
    """Nothing left in flight: the source applied the whole inbound topic (after that the
    database no longer changes), and the relay emptied the outbox (after that the change topic
    is final)."""
    applied = ex.sql("SELECT coalesce(sum(next_offset), 0) FROM dx.source_offsets "
                     "WHERE route = %s", SOURCE)[0][0]
    if int(applied) < inbound_end:
        return False
    return int(ex.sql("SELECT count(*) FROM dx.outbox")[0][0]) == 0


def crossed(ex: Exchange, shop_names: dict[str, int], pim_names: dict[str, int]) -> bool:
    """At least one shop edit reached the PIM and one PIM edit reached the database."""
    delivered = {d["name"] for d in ex.pim("/deliveries?limit=200")}
    in_db = {r[0] for r in ex.sql("SELECT name FROM public.products WHERE name LIKE 'pim-edit-%%'")}
    return bool(delivered & set(shop_names)) and bool(in_db & set(pim_names))


def sink_tasks(ex: Exchange) -> dict[str, int]:
    return {s: int(n) for s, n in ex.sql(
        "SELECT status, count(*) FROM dx.task WHERE route = %s GROUP BY 1", SINK)}


# -- the tests --------------------------------------------------------------------------------


def test_two_way_edits_converge_without_echo(exchange: Exchange) -> None:
    ex = exchange
    wait_for("the snapshot to reach the PIM",
             lambda: ex.pim("/stats")["records"].get("products", 0) >= PRODUCTS, 90, ex.alive)

    # Interleaved edits: hot keys on both sides (several rounds), and keys only one side edits.
    hot, shop_only, pim_only = [11, 12, 13, 14], [21, 22, 23], [31, 32, 33]
    plan: list[tuple[str, int]] = []
    for _ in range(3):
        plan += [(side, k) for k in hot for side in ("shop", "pim")]
        plan += [("shop", k) for k in shop_only] + [("pim", k) for k in pim_only]
    random.Random(20240601).shuffle(plan)
    shop_names: dict[str, int] = {}
    pim_names: dict[str, int] = {}
    with psycopg.connect(ex.db_url, autocommit=True) as conn:
        for i, (side, key) in enumerate(plan):
            if i == len(plan) // 2:
                # second wave on top of a half-propagated first one: some edits below start
                # from the other side's versions, some race them
                wait_for("some of the first wave to cross", lambda: crossed(ex, shop_names,
                                                                            pim_names), 60,
                         ex.alive)
            if side == "shop":
                name = f"shop-edit-{i}"
                conn.execute("UPDATE public.products SET name = %s, weight_g = weight_g + 1 "
                             "WHERE id = %s", (name, key))
                shop_names[name] = key
            else:
                name = f"pim-edit-{i}"
                reply = ex.pim(f"/products/{key}/edit", {"name": name})
                assert reply["status"] == "published", reply
                pim_names[name] = key

    # Wait until everything is processed, in the order that makes each step final.
    wait_for("the PIM's edits in the inbound topic",
             lambda: ex.pim("/stats")["published"] == len(pim_names), 30, ex.alive)
    inbound = read_all(ex.stack, ex.inbound_topic, avro=False)
    wait_for("the source to apply the inbound topic and the relay to empty the outbox",
             lambda: quiescent(ex, len(inbound)), 60, ex.alive)
    changes = read_all(ex.stack, ex.products_topic, avro=True)
    wait_for("the sink to handle every change event",
             lambda: sum(sink_tasks(ex).values()) >= len(changes), 60, ex.alive)

    # Nothing failed anywhere.
    tasks = sink_tasks(ex)
    assert set(tasks) <= {"succeeded", "skipped"}, tasks
    source_tasks = ex.sql('SELECT "offset", status, error FROM dx.task WHERE route = %s',
                          SOURCE)
    assert all(s == "skipped" and ("older" in e or "duplicate" in e or "a tie" in e)
               for _, s, e in source_tasks), source_tasks

    # DB -> PIM: every shop edit was delivered over HTTP (stored, or stale against a newer PIM
    # version that then won in the database).
    deliveries = ex.pim(f"/deliveries?limit={PRODUCTS + 1000}")
    delivered = {d["name"]: d for d in deliveries}
    missing = sorted(set(shop_names) - set(delivered))
    assert not missing, f"shop edits never delivered to the PIM: {missing}"
    assert all(delivered[n]["status"] == 200 for n in shop_names)

    # PIM -> DB: the inbound topic holds exactly the PIM's edits (nothing of the database's came
    # in). Each was refused by the version rule (a skipped task: a newer shop edit won), or
    # applied: it is on the change topic once with origin pim, unless a later PIM edit of the
    # same key in the same batch superseded it (the source applies a batch's events of one key
    # as one write). Keys only the PIM edited end on the PIM's last edit.
    assert sorted(v["name"] for _, v, _ in inbound) == sorted(pim_names)
    name_at = {offset: v["name"] for offset, v, _ in inbound}
    refused = {name_at[int(offset)] for offset, _, _ in source_tasks}
    by_origin: dict[str | None, list[str]] = {}
    for _, ev, headers in changes:
        if ev["op"] != "r":
            by_origin.setdefault(ev.get("origin"), []).append(ev["after"]["name"])
            assert headers.get("dx.origin", b"").decode() == (ev.get("origin") or "")
    applied = by_origin.get("pim", [])
    assert len(applied) == len(set(applied)), "a PIM edit was applied twice"
    assert set(applied) <= set(pim_names) - refused, f"origin pim on {applied}, {refused=}"
    for name in set(pim_names) - refused - set(applied):
        assert any(pim_names[a] == pim_names[name] and seq(a) > seq(name) for a in applied), \
            f"PIM edit {name} was neither applied, refused nor superseded"
    assert set(by_origin) <= {None, "pim"}, set(by_origin)
    assert set(by_origin.get(None, [])) == set(shop_names), "the database's own changes"

    # No echo: the PIM got none of its own edits back; the sink skipped exactly those events.
    echoed = [d for d in deliveries if str(d.get("name")).startswith("pim-edit-")]
    assert not echoed, f"the PIM received its own edits back: {echoed[:3]}"
    echo_skips = ex.sql("SELECT count(*) FROM dx.task WHERE route = %s AND status = 'skipped' "
                        "AND error LIKE 'echo:%%'", SINK)[0][0]
    assert echo_skips == len(applied) == tasks.get("skipped", 0)

    # Both sides agree on every row.
    db_rows = {int(r[0]): dict(zip(FIELDS, r, strict=True)) for r in ex.sql(
        f"SELECT {', '.join(FIELDS)} FROM public.products")}
    pim_rows = {int(r["id"]): {f: r.get(f) for f in FIELDS}
                for r in ex.pim(f"/products?limit={PRODUCTS + 100}")}
    assert len(db_rows) == len(pim_rows) == PRODUCTS
    differ = [(k, db_rows[k], pim_rows.get(k)) for k in db_rows if db_rows[k] != pim_rows.get(k)]
    assert not differ, f"{len(differ)} rows differ, e.g. {differ[:2]}"
    # ...and the edited keys ended on an edit (not on the seed row).
    for key in hot + shop_only + pim_only:
        assert db_rows[key]["name"].startswith(("shop-edit-", "pim-edit-")), db_rows[key]
    for key in shop_only:
        assert db_rows[key]["name"] == max((n for n, k in shop_names.items() if k == key),
                                           key=seq)
    for key in pim_only:
        assert db_rows[key]["name"] == max((n for n, k in pim_names.items() if k == key),
                                           key=seq)


def seq(name: str) -> int:
    """Position of an edit in the test's plan (names are shop-edit-N / pim-edit-N)."""
    return int(name.rsplit("-", 1)[1])


def test_demo_script_runs_end_to_end(stack: Any, pg_db: str, topic_prefix: str,
                                     tmp_path: Path) -> None:
    """``deploy/demo/run.py`` against the test stack, in its own database, prefix and state
    directory (a user's demo on the same machine is left alone), then ``run.py stop``."""
    run_py = DEMO / "run.py"
    state = tmp_path / "demo"
    env = {**os.environ, "DX_DATABASE_URL": stack.database_url,
           "DX_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
           "DX_SCHEMA_REGISTRY_URL": stack.schema_registry_url}
    database = pg_db.rsplit("/", 1)[1]
    pids: dict[str, int] = {}
    try:
        done = subprocess.run(
            [sys.executable, str(run_py), "--database", database, "--prefix", topic_prefix,
             "--state-dir", str(state), "--pim-port", "0", "--timeout", "60"],
            capture_output=True, text=True, env=env, timeout=200, cwd=REPO)
        out = done.stdout
        assert done.returncode == 0, f"{out[-3000:]}\n{done.stderr[-2000:]}"
        assert done.stderr.strip() == "", done.stderr
        pids = {n: p["pid"] for n, p in json.loads((state / "run.json").read_text())["pids"]
                .items()}
        assert set(pids) == {"pim", "relay", "sink", "source", "inbound", "pull", "console"}
        assert re.search(r"console\s+http://127\.0\.0\.1:\d+/ +\(user \S+, password \S+\)", out)
        assert "came as webhooks (dx inbound serve) and again from the changes feed" in out
        # both directions, shown
        assert len(re.findall(r"shop -> PIM\s+product \d+ version \d+ arrived", out)) == 3
        assert len(re.findall(r"PIM -> shop\s+product \d+ version \d+ applied", out)) == 3
        assert re.search(r"no echo: 3 PIM edits .* skipped them", out)
        assert "echo: origin 'pim'" in out  # dx tasks list shows the skipped echoes
        assert len(re.findall(r"op=u origin=pim", out)) == 3
        assert len(re.findall(r"op=u origin=db", out)) == 3
        assert "dx status" in out and "backlog" in out
        assert f"python3 deploy/demo/run.py stop --state-dir {state}" in out
        assert "deploy/local/stack down" in out
        for pid in pids.values():
            assert Path(f"/proc/{pid}").exists()
    finally:
        stopped = subprocess.run([sys.executable, str(run_py), "stop", "--state-dir", str(state)],
                                 capture_output=True, text=True, timeout=60, cwd=REPO)
    assert stopped.returncode == 0, stopped.stderr
    said = re.search(r"stopped (.*) of run", stopped.stdout)
    assert said and set(said.group(1).split(", ")) == set(pids), stopped.stdout
    for pid in pids.values():
        wait_for(f"pid {pid} to exit", lambda pid=pid: not _running(pid), 30)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
