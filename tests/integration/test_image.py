"""The container image, built from deploy/Dockerfile and run the way deploy/k8s runs it.

The image is built (tests/integration/image_support.py: the engine and base image come from
Debian packages when no registry can be reached) and its containers exchange rows both ways
with the real stack: `dx init` and `dx capture install` as one-shot containers, then a relay, a
sink worker (change topic -> a table through the postgres connector), a source worker (a JSON
inbound topic -> the captured table), the API (a POST -> the captured table) and the inbound
webhooks (a POST -> the inbound topic) side by side. Every container runs as k8s asks:
read-only root filesystem, all capabilities dropped, no privilege escalation, uid 10001, a
writable /tmp only. Each worker's /readyz (the HTTP servers' health endpoints) answers 200
before rows flow; `docker stop` (SIGTERM) ends each one with exit code 0, and nothing is lost:
every row on both sides, no failed task, an empty outbox.

Containers use the host's network (the engine here has no bridge), so they reach the stack on
127.0.0.1 like any process would; each worker's metrics port is a free one.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration import image_support
from tests.integration.test_source_support import create_topic, produce

API_KEY = "image-test-key"
HARDENING = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
             "--tmpfs", "/tmp:size=64m", "--network", "host")


@pytest.fixture(scope="module")
def image() -> tuple[image_support.Engine, str]:
    try:
        eng = image_support.engine()
    except image_support.NoEngine as err:
        pytest.skip(f"no container engine: {err}")
    return eng, image_support.build_image(eng)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(what: str, check: Callable[[], Any], timeout: float, on_timeout: Callable[[], str]
          ) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n"
                                 f"{on_timeout()}")
        time.sleep(0.3)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


def test_image_metadata(image: tuple[image_support.Engine, str]) -> None:
    eng, tag = image
    config = image_support.inspect(eng, tag)["Config"]
    assert isinstance(config, dict)
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["dx"]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert config["StopSignal"] == "SIGTERM"
    assert "DX_CONFIG=/etc/dx/dx.yaml" in config["Env"]


class Containers:
    def __init__(self, eng: image_support.Engine, tag: str, config: Path) -> None:
        self.eng, self.tag, self.config = eng, tag, config
        self.names: list[str] = []
        self.ports: dict[str, int] = {}

    def _args(self, metrics_port: int, env: dict[str, str] | None = None) -> list[str]:
        variables = {"DX_METRICS_PORT": str(metrics_port), "DX_METRICS_HOST": "127.0.0.1",
                     "DX_LOG_LEVEL": "INFO", **(env or {})}
        return [*HARDENING, "--user", "10001:10001", "-v", f"{self.config}:/etc/dx/dx.yaml:ro",
                *(arg for k, v in variables.items() for arg in ("-e", f"{k}={v}"))]

    def once(self, *command: str) -> str:
        done = self.eng.run("run", "--rm", *self._args(0), self.tag, *command, timeout=180,
                            check=False)
        assert done.returncode == 0, f"dx {' '.join(command)}: {done.stderr.strip()[-2000:]}"
        return done.stdout

    def start(self, role: str, *command: str, env: dict[str, str] | None = None) -> str:
        name = f"dx-test-{role}-{uuid.uuid4().hex[:8]}"
        port = _free_port()
        self.eng.run("run", "-d", "--name", name, *self._args(port, env), self.tag, *command)
        self.names.append(name)
        self.ports[name] = port
        return name

    def logs(self) -> str:
        out = []
        for name in self.names:
            done = self.eng.run("logs", "--tail", "15", name, check=False)
            out.append(f"--- {name}\n{(done.stdout + done.stderr).strip()}")
        return "\n".join(out)

    def stop(self, name: str) -> int:
        self.eng.run("stop", "--time", "60", name, timeout=120)
        state = image_support.inspect(self.eng, name)["State"]
        assert isinstance(state, dict)
        return int(state["ExitCode"])

    def remove_all(self) -> None:
        for name in self.names:
            self.eng.run("rm", "-f", name, check=False)


@pytest.fixture
def containers(image: tuple[image_support.Engine, str], tmp_path: Path,
               stack: Any, pg_db: str, topic_prefix: str) -> Iterator[Containers]:
    eng, tag = image
    config = tmp_path / "dx.yaml"
    config.write_text(f"""
database:
  url: {pg_db}
kafka:
  bootstrap_servers: {stack.kafka_bootstrap}
  topic_prefix: {topic_prefix}
schema_registry:
  url: {stack.schema_registry_url}
relay:
  name: {topic_prefix}
tables:
  - name: public.products
    columns: [id, name, version]
sinks:
  - name: copy
    topics: [{topic_prefix}.public.products]
    connector:
      type: postgres
      url: {pg_db}
      table: public.products_copy
sources:
  - name: inbound
    topic: {topic_prefix}.inbound.products
    format: json
    origin: pim
    table: public.products
    columns: [id, name, version]
    mode: upsert
    conflict: {{column: version, policy: last-writer-wins}}
    inbound:
      webhook: {{auth: {{kind: bearer, token: "{API_KEY}"}}}}
api:
  keys:
    - {{id: pim-key, system: pim, secret_env: DX_API_KEY_PIM, scopes: {{products: [read, write]}}}}
  entities:
    - {{alias: products, table: public.products, fields: {{id: {{}}, name: {{}}, version: {{}}}}}}
""")
    config.chmod(0o644)  # the containers' user (uid 10001) reads it
    running = Containers(eng, tag, config)
    try:
        yield running
    finally:
        running.remove_all()


def test_containers_exchange_both_ways_and_stop_cleanly(containers: Containers, stack: Any,
                                                         pg_db: str, topic_prefix: str) -> None:
    with psycopg.connect(pg_db, autocommit=True) as conn:
        for table in ("products", "products_copy"):
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text, version int)")
    containers.once("init")
    containers.once("capture", "install")
    inbound = f"{topic_prefix}.inbound.products"
    for topic in (inbound, f"{topic_prefix}.public.products"):
        create_topic(stack, topic)  # a sink is ready once it has partitions of existing topics

    containers.start("relay", "relay")
    containers.start("sink", "sink", "run", "copy")
    containers.start("source", "source", "run", "inbound")
    for name, port in list(containers.ports.items()):
        _wait(f"{name} /readyz", lambda p=port: _status(f"http://127.0.0.1:{p}/readyz") == 200,
              180, containers.logs)
    api_port = _free_port()
    containers.start("api", "api", "serve", env={
        "DX_API_HOST": "127.0.0.1", "DX_API_PORT": str(api_port), "DX_API_KEY_PIM": API_KEY})
    api = f"http://127.0.0.1:{api_port}"
    hooks_port = _free_port()
    containers.start("inbound", "inbound", "serve", env={
        "DX_INBOUND_HOST": "127.0.0.1", "DX_INBOUND_PORT": str(hooks_port)})
    hooks = f"http://127.0.0.1:{hooks_port}"
    for url in (f"{api}/-/health", f"{hooks}/healthz"):
        _wait(url, lambda u=url: _status(u) == 200, 180, containers.logs)

    with psycopg.connect(pg_db, autocommit=True) as conn:
        for i in range(1, 6):  # the shop's side: captured, relayed, delivered by the sink
            conn.execute("INSERT INTO products VALUES (%s, %s, 1)", (i, f"shop {i}"))
    produce(stack, inbound, [({"id": i}, {"id": i, "name": f"pim {i}", "version": 1})
                             for i in range(101, 106)])  # the PIM's side: applied by the source
    posted = urllib.request.Request(  # and through the API: applied, captured, delivered too
        f"{api}/products", method="POST", data=json.dumps(
            {"data": [{"id": 201, "name": "api 201", "version": 1}]}).encode(),
        headers={"X-Api-Key": API_KEY, "Content-Type": "application/json"})
    with urllib.request.urlopen(posted, timeout=30) as resp:
        assert resp.status in (200, 201), resp.read()
    hooked = urllib.request.Request(  # and as a webhook: to the topic, applied by the source
        f"{hooks}/inbound/inbound", method="POST", data=json.dumps(
            {"id": 301, "name": "hook 301", "version": 1}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(hooked, timeout=30) as resp:
        assert 200 <= resp.status < 300, resp.read()

    def copied() -> list[tuple[Any, ...]]:
        with psycopg.connect(pg_db) as conn:
            return conn.execute("SELECT id, name FROM products_copy ORDER BY id").fetchall()

    expected = ([(i, f"shop {i}") for i in range(1, 6)]
                + [(i, f"pim {i}") for i in range(101, 106)] + [(201, "api 201"),
                                                                 (301, "hook 301")])
    _wait("both sides' rows in products_copy", lambda: copied() == expected, 180,
          lambda: f"copied: {copied()}\n{containers.logs()}")

    exits = {name: containers.stop(name) for name in list(containers.names)}
    assert exits == dict.fromkeys(containers.names, 0), containers.logs()

    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT id, name FROM products ORDER BY id").fetchall() == expected
        assert conn.execute("SELECT count(*) FROM dx.outbox").fetchone() == (0,)
        bad = conn.execute("SELECT status, count(*) FROM dx.task "
                           "WHERE status NOT IN ('succeeded', 'skipped') GROUP BY 1").fetchall()
    assert bad == [], bad
    assert copied() == expected


def test_one_shot_commands_fail_with_one_line(containers: Containers) -> None:
    """A broken config fails in the container as it does outside: one line, exit 1."""
    containers.config.write_text("database: {url: x}\nkafka: {}\n")
    done = containers.eng.run("run", "--rm", *containers._args(0), containers.tag, "validate",
                              "--offline", check=False, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("dx: error: /etc/dx/dx.yaml"), lines
    assert json.dumps(lines)  # printable as it is
