#!/usr/bin/env python3
"""Run a Kafka Connect worker with Debezium's connectors next to dx's stack, without Docker.

    deploy/local/connect_worker.py up [NAME] | down [NAME] | status [NAME] | fetch

`up` starts one distributed-mode worker (a cluster of one) against the services in
DX_KAFKA_BOOTSTRAP and DX_SCHEMA_REGISTRY_URL (as `deploy/local/stack env` prints them), with its
REST API on 127.0.0.1:$DX_CONNECT_REST_PORT (a free port when unset), and prints
`export DX_CONNECT_URL=http://127.0.0.1:PORT`. Plugins, all from Maven Central through
deploy/local/connect/pom.xml: Debezium's PostgreSQL source and JDBC sink (3.6.0.Final) and
Apicurio's Avro converter (2.6.13.Final, Confluent wire format). The worker runs Kafka Connect at
the broker's version; its default converters are that Avro converter in Confluent wire format.

Several workers may run at once (different NAMEs, e.g. one per test session): each has its own
group id and internal topics, so they never join each other's cluster. State and logs live in
$DX_STACK_HOME/connect/NAME (the stack's state directory); the downloads are shared by all names.

Importable (standard library only): `start()`/`stop()` run a worker, :class:`Connect` talks to its
REST API (create a connector, wait until it runs, delete it). Failures are one line
(`dx-connect: ...` from the command line, :class:`ConnectError` from Python).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
POM = HERE / "connect" / "pom.xml"
HOST = "127.0.0.1"


def _load_stack() -> ModuleType:
    """deploy/local/stack as a module: its Maven, process and port helpers are reused here."""
    loader = importlib.machinery.SourceFileLoader("dx_local_stack", str(HERE / "stack"))
    spec = importlib.util.spec_from_loader("dx_local_stack", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


stack = _load_stack()
ROOT: Path = stack.STATE / "connect"
LIBS = ROOT / "libs"
PLUGINS = ROOT / "plugins"

# (maven profile, goal, folder it fills, a file that must exist afterwards)
DOWNLOADS = (
    ("worker", "copy-dependencies", LIBS, "connect-runtime-*.jar"),
    ("debezium-postgres", "copy-dependencies", PLUGINS / "debezium-connector-postgres",
     "debezium-connector-postgres-*.jar"),
    ("debezium-jdbc", "unpack", PLUGINS, "debezium-connector-jdbc/debezium-connector-jdbc-*.jar"),
    ("apicurio-converter", "copy-dependencies", PLUGINS / "apicurio-converter",
     "apicurio-registry-utils-converter-*.jar"),
)

# What `up` checks the worker found before it calls the worker ready.
REQUIRED_PLUGINS = (
    "io.debezium.connector.postgresql.PostgresConnector",
    "io.debezium.connector.jdbc.JdbcSinkConnector",
    "io.apicurio.registry.utils.converter.AvroConverter",
    "org.apache.kafka.connect.file.FileStreamSinkConnector",
)

AVRO_CONVERTER = "io.apicurio.registry.utils.converter.AvroConverter"


class ConnectError(Exception):
    """A Connect worker or connector failure, said in one line."""


# --------------------------------------------------------------------------- configuration


def registry_v2_url(schema_registry_url: str) -> str:
    """Apicurio's own v2 API (what its 2.6 converter speaks) from dx's Confluent-API URL."""
    base = schema_registry_url.rstrip("/")
    suffix = "/apis/ccompat/v7"
    if not base.endswith(suffix):
        raise ConnectError(
            f"DX_SCHEMA_REGISTRY_URL={schema_registry_url!r} is not an Apicurio Registry's "
            f"Confluent API (…{suffix}); the Apicurio converter needs that registry"
        )
    return base[: -len(suffix)] + "/apis/registry/v2"


def avro_converter(schema_registry_url: str, prefix: str = "value.converter") -> dict[str, str]:
    """Connector (or worker) settings for Apicurio's Avro converter in Confluent wire format:
    the 4-byte id is the registry's content id, as dx writes it through the Confluent API."""
    return {
        prefix: AVRO_CONVERTER,
        f"{prefix}.apicurio.registry.url": registry_v2_url(schema_registry_url),
        f"{prefix}.apicurio.registry.as-confluent": "true",
        f"{prefix}.apicurio.registry.use-id": "contentId",
        f"{prefix}.apicurio.registry.headers.enabled": "false",
        f"{prefix}.apicurio.registry.auto-register": "true",
    }


def worker_properties(name: str, bootstrap: str, registry_url: str, port: int,
                      exactly_once: bool = False) -> dict[str, str]:
    """A one-worker distributed cluster with its own group and internal topics (per start, so a
    restarted worker does not resume connectors a crashed run left behind). With
    `exactly_once`, source connectors write in Kafka transactions (KIP-618)."""
    cluster = f"dx-connect-{name}-{uuid.uuid4().hex[:8]}"
    props = {
        "bootstrap.servers": bootstrap,
        "group.id": cluster,
        "config.storage.topic": f"_{cluster}-configs",
        "offset.storage.topic": f"_{cluster}-offsets",
        "status.storage.topic": f"_{cluster}-status",
        "config.storage.replication.factor": "1",
        "offset.storage.replication.factor": "1",
        "status.storage.replication.factor": "1",
        "offset.storage.partitions": "1",
        "status.storage.partitions": "1",
        "offset.flush.interval.ms": "1000",
        "listeners": f"http://{HOST}:{port}",
        "rest.advertised.host.name": HOST,
        "rest.advertised.port": str(port),
        "plugin.path": str(PLUGINS),
        "plugin.discovery": "hybrid_warn",
        "exactly.once.source.support": "enabled" if exactly_once else "disabled",
        "scheduled.rebalance.max.delay.ms": "0",
        "task.shutdown.graceful.timeout.ms": "5000",
    }
    props.update(avro_converter(registry_url, "key.converter"))
    props.update(avro_converter(registry_url, "value.converter"))
    return props


LOG4J2 = """\
# Written by deploy/local/connect_worker.py on every start.
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d{ISO8601}] %p %m (%c{1})%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
logger.reflections.name = org.reflections
logger.reflections.level = ERROR
logger.hibernate.name = org.hibernate
logger.hibernate.level = WARN
"""


# --------------------------------------------------------------------------- downloads


def fetch(tools: Any) -> None:
    """The worker's classpath and the plugin folders, from Maven Central (once per pom)."""
    stamp = stack.sha(POM.read_bytes())
    marker = ROOT / ".complete"
    if marker.exists() and marker.read_text().strip() == stamp:
        return
    stack.say("downloading Kafka Connect, Debezium and the Apicurio converter (once)")
    for folder in (LIBS, PLUGINS):
        if folder.exists():
            shutil.rmtree(folder)
    for profile, goal, folder, expect in DOWNLOADS:
        option = "-Dplugin.dir" if goal == "unpack" else "-DoutputDirectory"
        log = stack.LOGS / f"maven-connect-{profile}.log"
        stack.maven(tools, POM, ["-P", profile, f"dependency:{goal}", f"{option}={folder}"],
                    log, f"downloading {profile} for Kafka Connect")
        base = LIBS if profile == "worker" else PLUGINS
        if not any(base.glob(expect)) and not any(folder.glob(expect)):
            raise stack.StackError(f"downloading {profile} produced no {expect}; see {log}")
    marker.write_text(stamp + "\n")


# --------------------------------------------------------------------------- the worker


def tools() -> Any:
    """Java 17+ and Maven (the stack's check would also demand PostgreSQL, which a worker does
    not need: the services may be containers)."""
    java = os.environ.get("DX_STACK_JAVA") or shutil.which("java")
    mvn = shutil.which("mvn")
    if java and mvn and stack.java_major(java) >= 17:
        return stack.Tools(pg_bin=Path("/nonexistent"), java=java, mvn=mvn)
    return stack.ensure_tools()  # installs what is missing, or says how


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _home(name: str) -> Path:
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ConnectError(f"worker name {name!r}: use letters, digits, '-' and '_'")
    return ROOT / "workers" / name


def _service(name: str, port: int) -> Any:
    return stack.Service(
        f"connect-{name}",
        port,
        (),
        ("DX_CONNECT_REST_PORT",),
        marker=f"-Ddx.connect.home={_home(name)} ",
        ready_timeout=stack._timeout("DX_CONNECT_TIMEOUT", 240),
    )


def _recorded_port(name: str) -> int | None:
    try:
        return int((_home(name) / "rest.port").read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Worker:
    name: str
    url: str  # REST API root, http://127.0.0.1:PORT
    log: Path
    group: str  # its Connect cluster's group id; internal topics are `_<group>-configs` etc.

    @property
    def internal_topics(self) -> tuple[str, ...]:
        return tuple(f"_{self.group}-{kind}" for kind in ("configs", "offsets", "status"))


def _group(name: str) -> str:
    for line in (_home(name) / "worker.properties").read_text().splitlines():
        if line.startswith("group.id="):
            return line.split("=", 1)[1]
    raise ConnectError(f"{_home(name) / 'worker.properties'} has no group.id")


def start(name: str, bootstrap: str, schema_registry_url: str, port: int | None = None, *,
          exactly_once: bool = False) -> Worker:
    """Start worker NAME (or return it when it runs) and wait until it serves requests with every
    plugin in REQUIRED_PLUGINS loaded."""
    home = _home(name)
    with stack.state_lock():
        running = _recorded_port(name)
        if running is not None and _service(name, running).pid() is not None:
            return Worker(name, f"http://{HOST}:{running}", _service(name, running).log,
                          _group(name))
        port = port or _env_port() or free_port()
        svc = _service(name, port)
        svc.check_ports_free()
        found = tools()
        fetch(found)
        home.mkdir(parents=True, exist_ok=True)
        props = worker_properties(name, bootstrap, schema_registry_url, port, exactly_once)
        (home / "worker.properties").write_text(
            "# Written by deploy/local/connect_worker.py on every start.\n"
            + "".join(f"{k}={v}\n" for k, v in props.items())
        )
        (home / "log4j2.properties").write_text(LOG4J2)
        (home / "rest.port").write_text(f"{port}\n")
        stack.say(f"starting Kafka Connect worker {name} on {HOST}:{port}")
        pid = svc.spawn(
            [
                found.java,
                f"-Xmx{os.environ.get('DX_CONNECT_HEAP', '512m')}",
                "-Xms128m",
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={home / 'log4j2.properties'}",
                f"-Ddx.connect.home={home}",
                "-cp",
                f"{LIBS}/*",
                "org.apache.kafka.connect.cli.ConnectDistributed",
                str(home / "worker.properties"),
            ],
            cwd=home,
        )
    url = f"http://{HOST}:{port}"
    try:
        _settle(svc, pid)
        svc.wait_ready(lambda: _ready(url))
        missing = sorted(set(REQUIRED_PLUGINS) - _plugins(url))
        if missing:
            raise ConnectError(f"Connect worker {name} lacks {', '.join(missing)}; "
                               f"see {svc.log}")
    except BaseException:
        svc.stop()
        raise
    return Worker(name, url, svc.log, props["group.id"])


def _settle(svc: Any, pid: int, timeout: float = 10) -> None:
    """Until the new process shows its command line (the readiness wait recognises the worker by
    it, and for a moment after exec /proc may not show it: seen once as a worker "exited during
    startup" with an empty log), or has really exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and svc.pid() is None and stack.pid_alive(pid):
        time.sleep(0.1)


def _env_port() -> int | None:
    raw = os.environ.get("DX_CONNECT_REST_PORT")
    return stack._port("DX_CONNECT_REST_PORT", 0) if raw else None


def _ready(url: str) -> bool:
    return bool(stack.http_status(f"{url}/health") == 200)


def _plugins(url: str) -> set[str]:
    listed = Connect(url).request("GET", "/connector-plugins?connectorsOnly=false")
    return {p["class"] for p in listed}


def stop(name: str) -> bool:
    """Stop worker NAME; False when it was not running."""
    port = _recorded_port(name)
    if port is None:
        return False
    return bool(_service(name, port).stop())


# --------------------------------------------------------------------------- REST API


class Connect:
    """The worker's REST API: connectors by name, each failure a :class:`ConnectError`."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,  # noqa: S310
                                     headers={"Content-Type": "application/json",
                                              "Accept": "application/json"})
        # A worker answers 409 while it rebalances (e.g. right after a connector was created).
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
                    raw = resp.read()
                    return json.loads(raw) if raw else None
            except urllib.error.HTTPError as exc:
                text = exc.read().decode("utf-8", "replace")
                if exc.code == 409 and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                raise ConnectError(f"{method} {self.url}{path}: HTTP {exc.code}: "
                                   f"{_message(text)}") from None
            except (urllib.error.URLError, OSError) as exc:
                raise ConnectError(f"{method} {self.url}{path}: {exc}") from None

    def create(self, name: str, config: dict[str, str]) -> None:
        """Create (or reconfigure) connector NAME; Connect validates the config first."""
        self.request("PUT", f"/connectors/{name}/config", config)

    def status(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/connectors/{name}/status")
        return result

    def wait_running(self, name: str, timeout: float = 120) -> None:
        """Until the connector and all its tasks run; a FAILED one raises with its cause."""
        deadline = time.monotonic() + timeout
        summary = "no status yet"
        while True:
            state: dict[str, Any] | None = None
            with contextlib.suppress(ConnectError):  # not known yet right after creation
                state = self.status(name)
            if state is not None:
                failure = failed(state)
                if failure:
                    raise ConnectError(f"connector {name} failed: {failure}")
                tasks = state.get("tasks", [])
                summary = ", ".join([f"connector {state['connector']['state']}",
                                     *(f"task {t['id']} {t['state']}" for t in tasks)])
                if (state["connector"]["state"] == "RUNNING" and tasks
                        and all(t["state"] == "RUNNING" for t in tasks)):
                    return
            if time.monotonic() > deadline:
                raise ConnectError(f"connector {name} not running after {timeout:.0f}s "
                                   f"({summary})")
            time.sleep(0.3)

    def delete(self, name: str) -> None:
        with contextlib.suppress(ConnectError):
            self.request("DELETE", f"/connectors/{name}")


def failed(state: dict[str, Any]) -> str | None:
    """The first line of the cause when the connector or a task FAILED, else None."""
    for part in (state.get("connector", {}), *state.get("tasks", [])):
        if part.get("state") == "FAILED":
            trace = str(part.get("trace") or "")
            return _cause(trace)
    return None


def _cause(trace: str) -> str:
    """The innermost `Caused by:` line of a Java stack trace (the telling one), else line one."""
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    causes = [line for line in lines if line.startswith("Caused by:")]
    return (causes[-1] if causes else lines[0] if lines else "no trace")[:400]


def _message(text: str) -> str:
    """The worker's error message as one line (validation errors come one per line)."""
    try:
        message = str(json.loads(text).get("message", text))
    except (ValueError, AttributeError):
        message = text
    lines = [line.strip() for line in message.splitlines()
             if line.strip() and not line.startswith("You can also find")]
    return "; ".join(lines)[:600]


# --------------------------------------------------------------------------- command line

USAGE = """usage: deploy/local/connect_worker.py COMMAND [NAME]

  fetch         download the worker and its plugins from Maven Central (once)
  up [NAME]     start worker NAME (default: default) and print `export DX_CONNECT_URL=...`
  down [NAME]   stop it
  status [NAME] one line (exit 3 when stopped)

environment: DX_KAFKA_BOOTSTRAP, DX_SCHEMA_REGISTRY_URL (required by `up`: eval "$(deploy/local/
  stack env)"), DX_CONNECT_REST_PORT (default: a free port), DX_CONNECT_HEAP (512m),
  DX_CONNECT_TIMEOUT (readiness, seconds, 240), DX_STACK_HOME, DX_STACK_MAVEN_REPO,
  DX_STACK_MAVEN_MIRROR (as for deploy/local/stack)
"""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if len(rest) > 1:
        raise ConnectError(f"{command}: unexpected argument {rest[1]!r}")
    name = rest[0] if rest else "default"
    if command == "fetch":
        with stack.state_lock():
            fetch(tools())
        return 0
    if command == "up":
        missing = [v for v in ("DX_KAFKA_BOOTSTRAP", "DX_SCHEMA_REGISTRY_URL")
                   if not os.environ.get(v)]
        if missing:
            raise ConnectError(f"{' and '.join(missing)} not set; "
                               'run: eval "$(deploy/local/stack env)"')
        worker = start(name, os.environ["DX_KAFKA_BOOTSTRAP"],
                       os.environ["DX_SCHEMA_REGISTRY_URL"])
        print(f"export DX_CONNECT_URL={worker.url}")
        return 0
    if command == "down":
        stack.say(f"stopped Kafka Connect worker {name}" if stop(name)
                  else f"Kafka Connect worker {name} was not running")
        return 0
    if command == "status":
        port = _recorded_port(name)
        if port is not None and _service(name, port).pid() is not None:
            print(f"connect-{name} running  http://{HOST}:{port}")
            return 0
        print(f"connect-{name} stopped")
        return 3
    raise ConnectError(f"unknown command {command!r}; try: fetch, up, down, status")


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ConnectError, stack.StackError) as exc:
        print(f"dx-connect: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
