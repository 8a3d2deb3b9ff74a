"""deploy/local/connect_worker.py without services: its settings and its one-line failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LOCAL = Path(__file__).resolve().parents[2] / "deploy" / "local"
sys.path.insert(0, str(LOCAL))

import connect_worker  # noqa: E402


def test_registry_url_becomes_apicurio_v2_api() -> None:
    assert (connect_worker.registry_v2_url("http://127.0.0.1:58081/apis/ccompat/v7/")
            == "http://127.0.0.1:58081/apis/registry/v2")


def test_a_non_apicurio_registry_is_refused_in_one_line() -> None:
    with pytest.raises(connect_worker.ConnectError, match="not an Apicurio Registry"):
        connect_worker.registry_v2_url("http://127.0.0.1:8081")


def test_each_start_is_its_own_connect_cluster() -> None:
    a = connect_worker.worker_properties("w", "k:1", "http://r/apis/ccompat/v7", 8083)
    b = connect_worker.worker_properties("w", "k:1", "http://r/apis/ccompat/v7", 8083)
    assert a["group.id"] != b["group.id"]
    assert a["config.storage.topic"] == f"_{a['group.id']}-configs"
    assert a["listeners"] == "http://127.0.0.1:8083"
    assert a["value.converter.apicurio.registry.as-confluent"] == "true"
    assert a["value.converter.apicurio.registry.use-id"] == "contentId"


def test_a_failed_task_reports_its_innermost_cause() -> None:
    state = {"connector": {"state": "RUNNING"},
             "tasks": [{"id": 0, "state": "FAILED",
                        "trace": "org.apache.kafka.connect.errors.ConnectException: outer\n"
                                 "\tat x.y(Z.java:1)\n"
                                 "Caused by: org.postgresql.util.PSQLException: refused\n"}]}
    assert connect_worker.failed(state) == (
        "Caused by: org.postgresql.util.PSQLException: refused")
    assert connect_worker.failed({"connector": {"state": "RUNNING"}, "tasks": []}) is None


def test_up_without_services_fails_in_one_line() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DX_KAFKA_BOOTSTRAP", "DX_SCHEMA_REGISTRY_URL")}
    proc = subprocess.run([sys.executable, str(LOCAL / "connect_worker.py"), "up", "t"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        'dx-connect: DX_KAFKA_BOOTSTRAP and DX_SCHEMA_REGISTRY_URL not set; '
        'run: eval "$(deploy/local/stack env)"']


def test_a_bad_worker_name_is_refused() -> None:
    with pytest.raises(connect_worker.ConnectError, match="worker name"):
        connect_worker.stop("../x")
