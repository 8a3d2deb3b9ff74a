"""Shared fixtures: the real stack (PostgreSQL, Kafka, schema registry) for integration tests.

Where the services come from, first match wins:
1. DX_DATABASE_URL, DX_KAFKA_BOOTSTRAP and DX_SCHEMA_REGISTRY_URL, when all three are set;
2. containers started with testcontainers, when asked (DX_TEST_CONTAINERS=1) or when a Docker
   engine answers and already holds the three images: an engine alone is not enough, since no
   registry may be reachable to pull them (tests/integration/test_image.py starts an engine);
3. `deploy/local/stack up` (PostgreSQL from Debian, Kafka and Apicurio from Maven Central), which
   stays running after the session so the next run starts in a second.

Only tests that request `stack` (or `pg_db`) start anything; tests under tests/unit never do.
Everything under tests/integration is marked `integration` (deselect with `-m "not integration"`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

REPO = Path(__file__).resolve().parent.parent
INTEGRATION = Path(__file__).resolve().parent / "integration"
LOCAL_STACK = REPO / "deploy" / "local" / "stack"

# Keep in step with deploy/compose.yaml and deploy/local/*/pom.xml.
POSTGRES_IMAGE = "postgres:15"
KAFKA_IMAGE = "apache/kafka:4.3.1"
REGISTRY_IMAGE = "apicurio/apicurio-registry:3.3.3"

ENV_VARS = ("DX_DATABASE_URL", "DX_KAFKA_BOOTSTRAP", "DX_SCHEMA_REGISTRY_URL")


@dataclass(frozen=True)
class Stack:
    database_url: str  # postgresql://shop:shop@host:port/dx (a superuser: tests create databases)
    kafka_bootstrap: str  # host:port
    schema_registry_url: str  # Confluent-compatible API root, e.g. http://host:port/apis/ccompat/v7


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


# --------------------------------------------------------------------------- the stack


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    values = [os.environ.get(name, "") for name in ENV_VARS]
    if all(values):
        yield Stack(*values)
        return
    if _use_containers():
        with _containers() as started:
            yield started
        return
    yield _local_stack()


def _use_containers() -> bool:
    asked = os.environ.get("DX_TEST_CONTAINERS", "")
    if asked:
        return asked not in ("0", "false", "no")
    if os.environ.get("DX_TEST_NO_DOCKER"):
        return False
    try:
        from testcontainers.core.docker_client import DockerClient

        images = DockerClient().client.images
        for ref in (POSTGRES_IMAGE, KAFKA_IMAGE, REGISTRY_IMAGE):
            images.get(ref)  # raises when the image is not there
    except Exception:
        return False
    return True


def _local_stack() -> Stack:
    up = subprocess.run(
        [str(LOCAL_STACK), "up"], capture_output=True, text=True, check=False, timeout=1800
    )
    if up.returncode != 0:
        lines = (up.stderr or up.stdout).strip().splitlines()
        pytest.fail(
            lines[-1] if lines else f"deploy/local/stack up failed ({up.returncode})",
            pytrace=False,
        )
    env = subprocess.run(
        [str(LOCAL_STACK), "env"], capture_output=True, text=True, check=True, timeout=60
    )
    found: dict[str, str] = {}
    for line in env.stdout.splitlines():
        parts = shlex.split(line)
        if len(parts) == 2 and parts[0] == "export" and "=" in parts[1]:
            key, _, value = parts[1].partition("=")
            found[key] = value
    missing = [name for name in ENV_VARS if name not in found]
    if missing:
        pytest.fail(f"deploy/local/stack env did not print {', '.join(missing)}", pytrace=False)
    return Stack(*(found[name] for name in ENV_VARS))


class _containers:
    """PostgreSQL, Kafka and Apicurio in containers on one Docker network (mirrors compose.yaml)."""

    def __init__(self) -> None:
        self._started: list[Any] = []
        self._network: Any = None

    def __enter__(self) -> Stack:
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        # Best effort: testcontainers' reaper removes whatever is left behind.
        for container in reversed(self._started):
            with contextlib.suppress(Exception):
                container.stop()
        self._started.clear()
        if self._network is not None:
            with contextlib.suppress(Exception):
                self._network.remove()
            self._network = None

    def _start(self) -> Stack:
        import psycopg
        from confluent_kafka.admin import AdminClient
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.network import Network

        self._network = Network().create()

        pg = (
            DockerContainer(POSTGRES_IMAGE)
            .with_env("POSTGRES_USER", "shop")
            .with_env("POSTGRES_PASSWORD", "shop")
            .with_env("POSTGRES_DB", "dx")
            .with_command(
                "postgres -c wal_level=logical -c max_connections=200 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off"
            )
            .with_exposed_ports(5432)
            .with_network(self._network)
            .with_network_aliases("postgres")
        )
        self._started.append(pg.start())
        host = pg.get_container_host_ip()
        database_url = f"postgresql://shop:shop@{host}:{pg.get_exposed_port(5432)}/dx"

        def pg_ready() -> bool:
            with psycopg.connect(database_url, connect_timeout=3, autocommit=True) as conn:
                if not conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = 'registry'"
                ).fetchone():
                    conn.execute("CREATE DATABASE registry")
            return True

        _wait("postgres container", pg_ready, 90)

        # Kafka advertises the address the host reaches it on, so the host port is fixed up front.
        kafka_port = _free_port()
        kafka = (
            DockerContainer(KAFKA_IMAGE)
            .with_envs(**_kafka_env(f"PLAINTEXT://{host}:{kafka_port}"))
            .with_bind_ports(9092, kafka_port)
            .with_network(self._network)
            .with_network_aliases("kafka")
        )
        self._started.append(kafka.start())
        kafka_bootstrap = f"{host}:{kafka_port}"

        def kafka_ready() -> bool:
            admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
            return bool(admin.list_topics(timeout=3).brokers)

        registry = (
            DockerContainer(REGISTRY_IMAGE)
            .with_envs(**_registry_env("jdbc:postgresql://postgres:5432/registry"))
            .with_exposed_ports(8080)
            .with_network(self._network)
        )
        self._started.append(registry.start())
        registry_url = (
            f"http://{registry.get_container_host_ip()}:{registry.get_exposed_port(8080)}"
            "/apis/ccompat/v7"
        )

        _wait("kafka container", kafka_ready, 120)
        _wait("registry container", lambda: _http_ok(f"{registry_url}/subjects"), 180)
        return Stack(database_url, kafka_bootstrap, registry_url)


def _kafka_env(advertised: str) -> dict[str, str]:
    return {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093",
        "KAFKA_ADVERTISED_LISTENERS": advertised,
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
        "KAFKA_NUM_PARTITIONS": "1",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_HEAP_OPTS": "-Xmx512m -Xms128m",
    }


def _registry_env(jdbc_url: str) -> dict[str, str]:
    return {
        "APICURIO_STORAGE_KIND": "sql",
        "APICURIO_STORAGE_SQL_KIND": "postgresql",
        "APICURIO_DATASOURCE_URL": jdbc_url,
        "APICURIO_DATASOURCE_USERNAME": "shop",
        "APICURIO_DATASOURCE_PASSWORD": "shop",
        "APICURIO_RULES_GLOBAL_COMPATIBILITY": "BACKWARD",
        "APICURIO_REST_DELETION_ARTIFACT_ENABLED": "true",
        "APICURIO_REST_DELETION_ARTIFACT_VERSION_ENABLED": "true",
        "APICURIO_REST_DELETION_GROUP_ENABLED": "true",
        "QUARKUS_HTTP_ACCESS_LOG_ENABLED": "false",
        "JAVA_OPTS_APPEND": "-Xmx384m",
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait(what: str, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except Exception as exc:
            last = exc
        time.sleep(1)
    pytest.fail(f"{what} did not become ready within {timeout:.0f}s ({last})", pytrace=False)


# --------------------------------------------------------------------------- per-test isolation


def _slug(request: pytest.FixtureRequest, size: int) -> str:
    return re.sub(r"[^a-z0-9]+", "", request.node.name.lower())[:size]


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@pytest.fixture
def pg_db(stack: Stack, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, uniquely named database on the stack's server; dropped after the test."""
    import psycopg
    from psycopg import sql

    name = f"dxt_{_slug(request, 30)}_{uuid.uuid4().hex[:10]}"
    admin_urls = [_with_database(stack.database_url, "postgres"), stack.database_url]

    def admin(statement: sql.Composable) -> None:
        error: Exception | None = None
        for url in admin_urls:
            try:
                with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(statement)
                return
            except psycopg.OperationalError as exc:  # e.g. no access to the `postgres` db
                error = exc
        assert error is not None
        raise error

    admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_database(stack.database_url, name)
    finally:
        # a relay a failed test left running still reads the database's replication slot, and
        # PostgreSQL refuses to drop a database with an active slot (FORCE or not); inactive
        # slots go with the database
        admin(sql.SQL("SELECT pg_terminate_backend(active_pid), pg_sleep(0.2) "
                      "FROM pg_replication_slots WHERE database = {} AND active_pid IS NOT NULL"
                      ).format(sql.Literal(name)))
        admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """A unique, lowercase alphanumeric prefix for this test's topics, subjects and groups."""
    return f"t{_slug(request, 20)}{uuid.uuid4().hex[:10]}"
