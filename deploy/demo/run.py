"""The demo exchange: the README's first command (``./dev demo``) runs this.

It builds a small two-way exchange on the running stack and shows it working::

    shop database ──capture──► outbox ──dx relay──► <prefix>.public.products ──dx sink run──► PIM
         ▲                                                                                    │
         └── dx source run ◄── <prefix>.pim.products ◄── dx inbound serve ◄── webhooks ───────┤
                                                     ◄── dx inbound pull ◄── changes feed ────┘

Steps: (re)create the demo database and load ``shop.sql``; write ``dx.yaml`` from the template
next to this file; ``dx init``, ``dx capture install``, ``dx snapshot`` every table; start the PIM
(``pim.py``), ``dx relay``, ``dx sink run pim-products``, ``dx source run pim-inbound``, ``dx
inbound serve`` (the PIM's webhooks) and ``dx inbound pull pim-inbound`` (its changes feed) in the
background; edit a few products in the database and a few in the PIM; wait until every edit
arrived on the other side and until the sink has *skipped* the PIM's own edits (no echo); print
what happened and how to reach everything. The workers keep running; stop them with::

    python3 deploy/demo/run.py stop

Decisions, so a second run behaves like the first:

* The demo database (``dx_demo``) is dropped and created again on every run: the seed data,
  versions and outbox always start from the same place.
* Topics, consumer groups and the relay name carry a prefix that is new for every run
  (``demo<utc time>``): a fresh database must never meet the relay cursor or consumer offsets of
  an earlier run. Old runs' topics stay in Kafka (they are small); ``deploy/local/stack down``
  and a fresh stack remove everything.
* A run first stops the processes of the previous run (pids in ``.dx-demo/run.json``).

``--database``, ``--prefix``, ``--state-dir`` and ``--pim-port`` (or DX_DEMO_DATABASE,
DX_DEMO_PREFIX, DX_DEMO_DIR, DX_DEMO_PIM_PORT) let a test run the demo next to a user's own.
Services come from DX_DATABASE_URL, DX_KAFKA_BOOTSTRAP and DX_SCHEMA_REGISTRY_URL, which
``./dev demo`` exports. Any failure ends the script with one ``demo: error: ...`` line and exit
code 1 (after stopping what it started).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

#: librdkafka's own chatter ("Purging 1 unserved events" when a consumer closes) would land on
#: the demo's stderr; the demo reports Kafka problems itself.
KAFKA_QUIET = logging.getLogger("demo.librdkafka")
KAFKA_QUIET.setLevel(logging.CRITICAL)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "deploy" / "demo"
TEMPLATE = DEMO / "dx.yaml"
SHOP_SQL = DEMO / "shop.sql"
PIM_SCRIPT = DEMO / "pim.py"
SERVICES = ("DX_DATABASE_URL", "DX_KAFKA_BOOTSTRAP", "DX_SCHEMA_REGISTRY_URL")
TABLES = ("public.products", "public.prices", "public.stock", "public.orders",
          "public.order_lines")
SINK_ROUTE = "pim-products"
SOURCE_ROUTE = "pim-inbound"
PIM_TOKEN = "demo-pim-token"  # noqa: S105 - a demo value the PIM and dx.yaml share
CONSOLE_USER = "demo"
CONSOLE_PASSWORD = "demo-operator"  # noqa: S105 - the demo operator's password, printed
WEBHOOK_SECRET = "demo-webhook-secret"  # noqa: S105 - dx.yaml's default for the demo
SHOP_TAG = "(shop edit)"
PIM_TAG = "(PIM edit)"
T = TypeVar("T")


class DemoError(Exception):
    """A step failed; the message is the one line the user sees."""


# -- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Where this run lives: names that keep it apart from other runs and from tests."""

    database: str
    prefix: str
    state_dir: Path
    pim_port: int
    timeout_s: float
    edits: int
    services: dict[str, str] = field(default_factory=dict)
    inbound_port: int = 0  # dx inbound serve (webhooks from the PIM)

    @property
    def database_url(self) -> str:
        return with_database(self.services["DX_DATABASE_URL"], self.database)

    @property
    def config_path(self) -> Path:
        return self.state_dir / "dx.yaml"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pim_url(self) -> str:
        return f"http://127.0.0.1:{self.pim_port}"

    @property
    def products_topic(self) -> str:
        return f"{self.prefix}.public.products"

    @property
    def inbound_topic(self) -> str:
        return f"{self.prefix}.pim.products"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="deploy/demo/run.py",
        description="Run the dx demo exchange (shop database <-> PIM), or stop it.")
    p.add_argument("command", nargs="?", choices=("run", "stop"), default="run",
                   help="run (default) or stop the workers and the PIM of the last run")
    p.add_argument("--database", default=env("DX_DEMO_DATABASE", "dx_demo"),
                   help="demo database on the DX_DATABASE_URL server; dropped and created "
                        "again [DX_DEMO_DATABASE]")
    p.add_argument("--prefix", default=env("DX_DEMO_PREFIX"),
                   help="topic/group/relay prefix; default new per run [DX_DEMO_PREFIX]")
    p.add_argument("--state-dir", type=Path, default=Path(env("DX_DEMO_DIR", REPO / ".dx-demo")),
                   help="dx.yaml, logs and pids of the run [DX_DEMO_DIR]")
    p.add_argument("--pim-port", type=int, default=int(env("DX_DEMO_PIM_PORT", "8090")),
                   help="PIM port; 0 or a busy port picks a free one [DX_DEMO_PIM_PORT]")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for each step (delivery, apply) before failing")
    p.add_argument("--edits", type=int, default=3, help="products edited on each side")
    args = p.parse_args(argv)
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", args.database):
        p.error("--database: lowercase letters, digits and '_' (a plain PostgreSQL name)")
    if args.prefix is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", args.prefix):
        p.error("--prefix: letters, digits, '_' and '-'")
    if not 1 <= args.edits <= 20:
        p.error("--edits: between 1 and 20")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    """Resolve defaults that need the environment: services, a fresh prefix, a free port."""
    missing = [name for name in SERVICES if not os.environ.get(name)]
    if missing:
        raise DemoError(f"{', '.join(missing)} not set: run ./dev demo, or "
                        'eval "$(deploy/local/stack env)" first')
    prefix = args.prefix or time.strftime("demo%Y%m%d%H%M%S", time.gmtime())
    return Settings(database=args.database, prefix=prefix,
                    state_dir=args.state_dir.resolve(), pim_port=pick_port(args.pim_port),
                    timeout_s=args.timeout, edits=args.edits,
                    services={name: os.environ[name] for name in SERVICES},
                    inbound_port=pick_port(0))


def pick_port(wanted: int) -> int:
    """The wanted port when it is free, else one the OS hands out (a demo must not fail on a
    busy 8090)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", wanted))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


# -- output -----------------------------------------------------------------------------------


def step(text: str) -> None:
    """A numbered-looking heading per step, so a failure's context is on screen."""
    print(f"\n==> {text}", flush=True)


def say(text: str = "") -> None:
    print(text, flush=True)


def indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + line if line.strip() else line for line in text.rstrip().splitlines())


# -- processes --------------------------------------------------------------------------------


class Processes:
    """The background processes of one run. Pids go to ``run.json`` as each starts, so
    ``stop`` (or the next run) can end exactly these and nothing else."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.state_file = s.state_dir / "run.json"

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.s.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.s.log_dir / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=REPO, env={**os.environ, **(env or {})}, start_new_session=True)
        self._save()

    def _save(self) -> None:
        state = {"prefix": self.s.prefix, "database": self.s.database,
                 "pids": {n: {"pid": p.pid, "marker": marker(p.args)}
                          for n, p in self.procs.items()}}
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")

    def check_alive(self) -> None:
        """A worker that died makes every later wait pointless: say which, and why."""
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                raise DemoError(f"{name} exited with code {code}: {last_line(self.log(name))} "
                                f"(log: {self.log(name)})")

    def log(self, name: str) -> Path:
        return self.s.log_dir / f"{name}.log"


def marker(args: Any) -> str:
    """What ``stop`` expects in /proc/PID/cmdline before signalling PID (pids get reused)."""
    argv = [str(a) for a in args] if isinstance(args, list | tuple) else [str(args)]
    return next((a for a in argv if a.endswith(("pim.py", "dx.yaml"))), argv[-1])


def last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip()[:300] if lines else "(empty log)"


def stop(state_dir: Path, quiet: bool = False) -> int:
    """End the processes recorded in ``run.json``: SIGTERM (workers finish their batch), then
    SIGKILL after 20 s. Only pids whose command line still matches are signalled."""
    state_file = state_dir / "run.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        if not quiet:
            say(f"demo: nothing to stop (no {state_file})")
        return 0
    mine = {name: int(p["pid"]) for name, p in state.get("pids", {}).items()
            if owns(int(p["pid"]), str(p["marker"]))}
    for pid in mine.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(alive(pid) for pid in mine.values()):
        time.sleep(0.2)
    for pid in mine.values():
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    state_file.unlink(missing_ok=True)
    if not quiet:
        say(f"demo: stopped {', '.join(mine) or 'nothing (already gone)'}"
            f"{' of run ' + state['prefix'] if mine else ''}")
    return 0


def owns(pid: int, expected: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return expected in cmdline


def alive(pid: int) -> bool:
    """Running and not a zombie (our children are reaped by nobody once we exit)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z"


def wait_until(what: str, check: Callable[[], T | None], s: Settings,
               procs: Processes | None = None, timeout_s: float | None = None) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline,
    or at once when a background process died."""
    deadline = time.monotonic() + (timeout_s or s.timeout_s)
    while True:
        if procs is not None:
            procs.check_alive()
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout_s or s.timeout_s:.0f}s waiting for {what}")
        time.sleep(0.25)


# -- dx, the database, the PIM ----------------------------------------------------------------


def dx_argv(s: Settings, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args, "-c", str(s.config_path)]


def dx(s: Settings, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one dx command to completion; a failure is its own one-line error."""
    done = subprocess.run(dx_argv(s, *args), capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "COLUMNS": "150", "DX_LOG_LEVEL": "WARNING"},
                          timeout=max(120.0, s.timeout_s), check=False)
    if check and done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        raise DemoError(f"dx {' '.join(args)} failed: {lines[-1]}")
    return done


@contextlib.contextmanager
def db(url: str, autocommit: bool = True) -> Iterator[Any]:
    """A connection through dx's own helper (unreachable server -> one clear line)."""
    from pipeline.db import connection

    with connection(url, autocommit=autocommit, application_name="dx-demo") as conn:
        yield conn


def pim_call(s: Settings, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST ``body`` to) the PIM; a refused call is a demo failure."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(  # noqa: S310 - http://127.0.0.1, our own PIM
        s.pim_url + path, data=data, method="POST" if data else "GET",
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:  # noqa: S310 - our own PIM
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise DemoError(f"PIM {path}: HTTP {err.code} {err.read().decode()[:200]}") from None
    except (urllib.error.URLError, OSError) as err:
        raise DemoError(f"PIM {path}: {err}") from None


def url_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - our own process
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def pim_up(s: Settings) -> bool:
    try:
        return bool(pim_call(s, "/healthz"))
    except DemoError:
        return False


# -- the steps --------------------------------------------------------------------------------


def create_database(s: Settings) -> None:
    """Drop and create the demo database, then load the shop: every run starts the same."""
    from psycopg import sql

    step(f"database {s.database}: create and load {SHOP_SQL.relative_to(REPO)}")
    with db(s.services["DX_DATABASE_URL"]) as conn:
        name = sql.Identifier(s.database)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(name))
    with db(s.database_url) as conn:
        conn.execute(SHOP_SQL.read_text())
        counts = {t: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(*t.split(".")))).fetchone()[0] for t in TABLES}
    say("    " + ", ".join(f"{n:,} {t.split('.')[1]}" for t, n in counts.items()))


def write_config(s: Settings) -> None:
    """Fill the template's ${VAR}s and check the result with dx's own loader."""
    from pipeline.config.loader import load_config

    step(f"configuration {s.config_path}")
    values = {**s.services, "DX_DEMO_DATABASE_URL": s.database_url, "DX_DEMO_PREFIX": s.prefix,
              "DX_PIM_URL": s.pim_url, "DX_PIM_TOKEN": PIM_TOKEN}

    def fill(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise DemoError(f"{TEMPLATE}: no value for ${{{m.group(1)}}}")
        return values[m.group(1)]

    text = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", fill, TEMPLATE.read_text())
    s.config_path.write_text(f"# written by deploy/demo/run.py from {TEMPLATE.name}\n{text}")
    cfg = load_config(s.config_path)
    say(f"    {len(cfg.tables)} tables, sink {SINK_ROUTE} -> {s.pim_url}, "
        f"source {SOURCE_ROUTE} <- {s.inbound_topic}, prefix {s.prefix}")


def install_capture(s: Settings) -> None:
    """dx init, capture triggers, and a snapshot of every table (the PIM starts empty)."""
    step("dx init, dx capture install, dx snapshot")
    say("    " + dx(s, "init").stdout.strip())
    say(indent(dx(s, "capture", "install").stdout))
    for table in TABLES:
        say("    " + dx(s, "snapshot", table).stdout.strip().splitlines()[-1])


def create_inbound_topic(s: Settings) -> None:
    """The PIM's topic (and its route's dead-letter topic) exist before anyone reads or writes
    them: the demo's Kafka may run with broker auto-create off, like production."""
    from pipeline.config.loader import load_config
    from pipeline.events.topics import ensure_route_topics

    cfg = load_config(s.config_path)
    ensure_route_topics(cfg.kafka, cfg.source(SOURCE_ROUTE)[1])


def topic_exists(s: Settings, topic: str) -> bool:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": s.services["DX_KAFKA_BOOTSTRAP"]},
                        logger=KAFKA_QUIET)
    return topic in admin.list_topics(topic, timeout=5).topics and \
        admin.list_topics(topic, timeout=5).topics[topic].error is None


def start_exchange(s: Settings, procs: Processes) -> None:
    """PIM first (the sink delivers to it), relay next (it creates the entity topics), then the
    two route workers once their topics exist."""
    step("start the PIM, dx relay, dx sink run, dx source run, dx inbound serve and pull "
         f"(logs in {s.log_dir})")
    create_inbound_topic(s)
    worker_env = {"DX_LOG_LEVEL": "INFO", "DX_LOG_FORMAT": "text", "PYTHONUNBUFFERED": "1",
                  "DX_METRICS_PORT": "0"}  # the workers must not race for one metrics port
    hooks = f"http://127.0.0.1:{s.inbound_port}"
    procs.start("inbound", dx_argv(s, "inbound", "serve", "--port", str(s.inbound_port)),
                worker_env)
    wait_until("dx inbound serve to answer", lambda: url_up(hooks + "/healthz"), s, procs)
    # --topic: the PIM publishes its edits where the route reads (it took DX_KAFKA_BOOTSTRAP
    # from the environment and wrote to an unprefixed pim.products that nobody created)
    procs.start("pim", [sys.executable, str(PIM_SCRIPT), "--port", str(s.pim_port),
                        "--topic", s.inbound_topic,
                        "--token", PIM_TOKEN, "--webhook-secret", WEBHOOK_SECRET,
                        "--webhook-url", f"{hooks}/inbound/{SOURCE_ROUTE}"])
    wait_until("the PIM to answer", lambda: pim_up(s), s, procs, timeout_s=30)
    procs.start("relay", dx_argv(s, "relay"), worker_env)
    wait_until("dx relay to become active",
               lambda: ": active" in procs.log("relay").read_text(errors="replace"), s, procs)
    wait_until(f"topic {s.products_topic}", lambda: topic_exists(s, s.products_topic), s, procs)
    procs.start("sink", dx_argv(s, "sink", "run", SINK_ROUTE), worker_env)
    procs.start("source", dx_argv(s, "source", "run", SOURCE_ROUTE), worker_env)
    procs.start("pull", dx_argv(s, "inbound", "pull", SOURCE_ROUTE), worker_env)
    for name, proc in procs.procs.items():
        say(f"    {name:<7} pid {proc.pid:<8} {procs.log(name).relative_to(s.state_dir.parent)}")


def start_console(s: Settings, procs: Processes) -> str:
    """The operator console with a demo operator (the database is new on every run); its URL."""
    done = subprocess.run(dx_argv(s, "console", "user", "add", CONSOLE_USER, "--role", "admin"),
                          capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
                          env={**os.environ, "DX_CONSOLE_PASSWORD": CONSOLE_PASSWORD})
    if done.returncode != 0:
        raise DemoError(f"dx console user add failed: {last_line_of(done.stderr)}")
    url = f"http://127.0.0.1:{pick_port(8091)}"
    procs.start("console", dx_argv(s, "console", "serve", "--port", url.rsplit(":", 1)[1]),
                {"DX_METRICS_PORT": "0"})

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:  # noqa: S310
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    wait_until("the console to answer", ready, s, procs, timeout_s=60)
    return url


def last_line_of(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no output"


def product_count(s: Settings) -> int:
    with db(s.database_url) as conn:
        return int(conn.execute("SELECT count(*) FROM public.products").fetchone()[0])


def wait_for_snapshot(s: Settings, procs: Processes) -> None:
    """The snapshot's products reach the PIM: only then can the PIM edit them."""
    step("initial load: the snapshot of products reaches the PIM")
    want = product_count(s)
    started = time.monotonic()
    wait_until(f"the PIM to hold all {want} products from the snapshot",
               lambda: pim_call(s, "/stats")["records"].get("products", 0) >= want, s, procs)
    say(f"    PIM holds {want:,} products ({time.monotonic() - started:.1f}s)")


@dataclass
class Edits:
    """What each side changed, for checking and for the summary."""

    shop: dict[int, tuple[str, int]] = field(default_factory=dict)  # id -> (name, version)
    pim: dict[int, tuple[str, int]] = field(default_factory=dict)


def edit_in_shop(s: Settings, edits: Edits) -> None:
    """An ordinary UPDATE, as the shop application would do it (no dx involved)."""
    ids = list(range(101, 101 + s.edits))
    step(f"edit {len(ids)} products in the shop database (UPDATE ... id IN {tuple(ids)})")
    with db(s.database_url, autocommit=False) as conn:
        rows = conn.execute(
            "UPDATE public.products SET name = name || ' ' || %s, weight_g = weight_g + 1 "
            "WHERE id = ANY(%s) RETURNING id, name, version", (SHOP_TAG, ids)).fetchall()
        conn.commit()
    for pid, name, version in sorted(rows):
        edits.shop[int(pid)] = (str(name), int(version))
        say(f"    product {pid}: {name!r} version {version}")


def edit_in_pim(s: Settings, edits: Edits) -> None:
    """Edits made in the PIM's own UI: it bumps the version and sends a signed webhook to ``dx
    inbound serve`` (which answers once Kafka took it); its changes feed has them too, for ``dx
    inbound pull``. The route applies them with origin ``pim``."""
    ids = list(range(201, 201 + s.edits))
    step(f"edit {len(ids)} products in the PIM (POST {s.pim_url}/products/ID/edit)")
    for pid in ids:
        current = pim_call(s, f"/products/{pid}")
        reply = pim_call(s, f"/products/{pid}/edit", {
            "name": f"{current['name']} {PIM_TAG}",
            "description": f"Edited in the PIM at {time.strftime('%H:%M:%S')}."})
        record = reply["record"]
        edits.pim[pid] = (str(record["name"]), int(record["version"]))
        say(f"    product {pid}: {record['name']!r} version {record['version']} "
            f"({reply['status']}, event {reply['event_id'][:8]})")


def wait_for_exchange(s: Settings, procs: Processes, edits: Edits) -> None:
    """Both directions arrive, then the sink skips the PIM's edits instead of sending them
    back: the proof that nothing echoes."""
    step("wait for both directions")
    for pid, (_, version) in edits.shop.items():
        started = time.monotonic()
        wait_until(f"the shop's edit of product {pid} to reach the PIM",
                   partial(pim_has_version, s, pid, version), s, procs)
        say(f"    shop -> PIM   product {pid} version {version} arrived "
            f"({time.monotonic() - started:.1f}s)")
    for pid, (name, version) in edits.pim.items():
        started = time.monotonic()
        wait_until(f"the PIM's edit of product {pid} to be applied to the database",
                   partial(db_has_name, s, pid, name), s, procs)
        say(f"    PIM -> shop   product {pid} version {version} applied "
            f"({time.monotonic() - started:.1f}s)")
    n = len(edits.pim)
    wait_until(f"the sink to skip the {n} PIM edits as echoes",
               lambda: echo_skips(s) >= n, s, procs)
    echoed = [d for d in pim_call(s, f"/deliveries?limit={100 + 10 * n}")
              if PIM_TAG in str(d.get("name") or "")]
    if echoed:
        raise DemoError(f"echo: the PIM received its own edit back: {echoed[0]}")
    wait_until("dx inbound pull to read the PIM's changes feed",
               lambda: pulled(s) >= n, s, procs)
    say(f"    inbound: the {n} PIM edits came as webhooks (dx inbound serve) and again from the "
        f"changes feed (dx inbound pull, {pulled(s)} entities); one event id per product "
        "version, so the second copy is a 'duplicate' skip, not a second write")
    say(f"    no echo: {n} PIM edits came back through the outbox with origin 'pim' and "
        f"route {SINK_ROUTE} skipped them; the PIM received none of them")


def pulled(s: Settings) -> int:
    """Entities ``dx inbound pull`` has read from the PIM's changes feed."""
    with db(s.database_url) as conn:
        if conn.execute("SELECT to_regclass('dx.inbound_state')").fetchone() == (None,):
            return 0
        row = conn.execute("SELECT entities FROM dx.inbound_state WHERE route = %s "
                           "AND kind = 'pull'", (SOURCE_ROUTE,)).fetchone()
    return int(row[0]) if row else 0


def pim_has_version(s: Settings, pid: int, version: int) -> bool:
    try:
        return int(pim_call(s, f"/products/{pid}").get("version") or 0) >= version
    except DemoError:
        return False


def db_has_name(s: Settings, pid: int, name: str) -> bool:
    with db(s.database_url) as conn:
        row = conn.execute("SELECT name FROM public.products WHERE id = %s", (pid,)).fetchone()
    return row is not None and row[0] == name


def echo_skips(s: Settings) -> int:
    with db(s.database_url) as conn:
        return int(conn.execute(
            "SELECT count(*) FROM dx.task WHERE route = %s AND status = 'skipped' "
            "AND error LIKE 'echo:%%'", (SINK_ROUTE,)).fetchone()[0])


# -- the summary ------------------------------------------------------------------------------


def show(s: Settings, edits: Edits) -> None:
    """What a person wants to see after the demo: both ends, dx's own view, a few events."""
    show_pim(s)
    show_rows(s, edits)
    config = (s.config_path.relative_to(REPO) if s.config_path.is_relative_to(REPO)
              else s.config_path)
    step(f"dx status -c {config}")
    done = dx(s, "status", check=False)
    say(indent(done.stdout or done.stderr))
    show_tasks(s)
    show_events(s, 2 * s.edits)


def show_pim(s: Settings) -> None:
    stats = pim_call(s, "/stats")
    step(f"the PIM ({s.pim_url}/stats, /deliveries)")
    say(f"    received {stats['received']:,} deliveries ({stats['stored']:,} stored, "
        f"{stats['stale']} stale, {stats['duplicates']} duplicates), made {stats['edits']} "
        f"edits, published {stats['published']}")
    say("    last deliveries:")
    for d in pim_call(s, "/deliveries?limit=5"):
        say(f"      {d['at']}  {d['method']:<6} {d['path']:<15} {d['status']} {d['result']:<7}"
            f" v{d['version']}  {d['name']}")


def show_rows(s: Settings, edits: Edits) -> None:
    step("the shop database: rows changed by the PIM (origin pim)")
    with db(s.database_url) as conn:
        rows = conn.execute(
            "SELECT id, name, version, updated_at FROM public.products WHERE id = ANY(%s) "
            "ORDER BY id", (list(edits.pim),)).fetchall()
    for pid, name, version, updated in rows:
        say(f"    {pid:>5}  v{version}  {updated:%H:%M:%S}  {name}")


def show_tasks(s: Settings) -> None:
    step("tasks by route and status (dx tasks list)")
    with db(s.database_url) as conn:
        counts = conn.execute(
            "SELECT route, status, count(*) FROM dx.task GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
    for route, status, n in counts:
        say(f"    {route:<14} {status:<10} {n:>6,}")
    say(f"\n    dx tasks list --route {SINK_ROUTE} --status skipped -n 5   (the echoes)")
    listed = dx(s, "tasks", "list", "--route", SINK_ROUTE, "--status", "skipped", "-n", "5")
    say(indent(listed.stdout))


def show_events(s: Settings, n: int) -> None:
    """The newest change events on the products topic, decoded with the registry like any
    consumer would (isolation read_committed: the relay writes in transactions)."""
    step(f"the last {n} change events on {s.products_topic}")
    for ev in tail_events(s, s.products_topic, n):
        after = ev.get("after") or {}
        say(f"    op={ev['op']} origin={ev.get('origin') or 'db':<4} id={after.get('id')} "
            f"v{after.get('version')}  {after.get('name')}  event_id={str(ev['event_id'])[:8]}")


def tail_events(s: Settings, topic: str, n: int) -> list[dict[str, Any]]:
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    decode = AvroDeserializer(SchemaRegistryClient({"url": s.services["DX_SCHEMA_REGISTRY_URL"]}))
    consumer = Consumer({"bootstrap.servers": s.services["DX_KAFKA_BOOTSTRAP"],
                         "group.id": f"{s.prefix}-demo-tail", "enable.auto.commit": False,
                         "isolation.level": "read_committed"}, logger=KAFKA_QUIET)
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.assign([TopicPartition(topic, 0, max(low, high - 3 * n))])
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                if events:
                    break
                continue
            if msg.error() or msg.value() is None:
                continue
            events.append(decode(msg.value(), SerializationContext(topic, MessageField.VALUE)))
    finally:
        consumer.close()
    return events[-n:]


def show_access(s: Settings, console_url: str) -> None:
    rel = s.state_dir.relative_to(REPO) if s.state_dir.is_relative_to(REPO) else s.state_dir
    step("the demo exchange is running")
    say(f"""    PIM          {s.pim_url}   (GET /stats /deliveries /products/101;
                 POST /products/201/edit with {{"name": "..."}} to edit in the PIM)
    console      {console_url}/   (user {CONSOLE_USER}, password {CONSOLE_PASSWORD})
    dx           .venv/bin/dx status -c {rel}/dx.yaml   (or export DX_CONFIG={rel}/dx.yaml)
    database     {s.database_url}
    Kafka        {s.services['DX_KAFKA_BOOTSTRAP']}   topics {s.products_topic} (out),
                 {s.inbound_topic} (in)
    registry     {s.services['DX_SCHEMA_REGISTRY_URL']}
    webhooks     http://127.0.0.1:{s.inbound_port}/inbound/{SOURCE_ROUTE}   (dx inbound serve;
                 the PIM signs its edits with the demo secret)
    logs         {rel}/logs/  (pim.log relay.log sink.log source.log inbound.log pull.log
                 console.log)
    environment  eval "$(deploy/local/stack env)"  sets DX_DATABASE_URL, DX_KAFKA_BOOTSTRAP,
                 DX_SCHEMA_REGISTRY_URL (the stack's server; the demo database is {s.database})

To stop the workers, the console and the PIM:
    python3 deploy/demo/run.py stop{stop_args(s)}
To stop the stack:
    deploy/local/stack down""")


def stop_args(s: Settings) -> str:
    default = (REPO / ".dx-demo").resolve()
    return "" if s.state_dir == default else f" --state-dir {shlex.quote(str(s.state_dir))}"


# -- main -------------------------------------------------------------------------------------


def run(s: Settings) -> None:
    s.state_dir.mkdir(parents=True, exist_ok=True)
    stop(s.state_dir, quiet=True)  # a second run replaces the first
    say(f"dx demo: database {s.database}, topic prefix {s.prefix}, state in {s.state_dir}")
    create_database(s)
    write_config(s)
    install_capture(s)
    procs = Processes(s)
    try:
        start_exchange(s, procs)
        wait_for_snapshot(s, procs)
        edits = Edits()
        edit_in_shop(s, edits)
        edit_in_pim(s, edits)
        wait_for_exchange(s, procs, edits)
        show(s, edits)
        console_url = start_console(s, procs)
    except BaseException:
        stop(s.state_dir, quiet=True)
        raise
    show_access(s, console_url)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "stop":
        return stop(args.state_dir.resolve())
    from pipeline.errors import DxError

    try:
        run(settings_from(args))
    except (DemoError, DxError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 1
    except subprocess.TimeoutExpired as err:
        print(f"demo: error: {shlex.join(str(a) for a in err.cmd)} did not finish in "
              f"{err.timeout:.0f}s", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted; stopped what it started", file=sys.stderr)
        return 130
    except Exception as err:  # a bug here must still end in one line (traceback on request)
        if os.environ.get("DX_DEMO_DEBUG"):
            raise
        print(f"demo: error: unexpected {type(err).__name__}: {err} (DX_DEMO_DEBUG=1 shows "
              "the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
