"""The Kafka Connect harness (deploy/local/connect_worker.py): a worker with Debezium's plugins
runs against the test stack, and a connector's failure comes back as one line with its cause."""

from __future__ import annotations

import socket

import pytest
from connect_worker import Connect, ConnectError


@pytest.mark.timeout(900)  # the first run downloads the worker and plugins from Maven Central
def test_invalid_connector_config_is_one_line(connect: Connect) -> None:
    try:
        with pytest.raises(ConnectError) as err:
            connect.create("bad-config", {
                "connector.class": "io.debezium.connector.jdbc.JdbcSinkConnector",
                "topics": "nothing", "tasks.max": "many"})
    finally:
        connect.delete("bad-config")
    assert "HTTP 400" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.timeout(900)
def test_unreachable_database_fails_the_task_with_its_cause(connect: Connect) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    name = "unreachable-db"
    connect.create(name, {
        "connector.class": "io.debezium.connector.jdbc.JdbcSinkConnector",
        "topics": f"{name}-topic",
        "connection.url": f"jdbc:postgresql://127.0.0.1:{port}/nothing",
        "connection.username": "dx", "connection.password": "dx"})
    try:
        with pytest.raises(ConnectError) as err:
            connect.wait_running(name, timeout=120)
        assert f"connector {name} failed:" in str(err.value)
        assert "\n" not in str(err.value)
    finally:
        connect.delete(name)
