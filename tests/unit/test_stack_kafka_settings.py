"""`deploy/local/stack up` applies changed Kafka settings to a stack already running.

Kafka reads server.properties only at start, and auto.create.topics.enable cannot be changed on
a running broker, so a stack started before auto-create was turned off would go on creating
topics for whoever writes to them. `up` compares the settings the running broker was started
with (the file written at its start) with the current ones and restarts Kafka when they differ.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import pytest

from tests.stack_script import load_stack


def _load_stack(home: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    for key in [k for k in os.environ if k.startswith("DX_STACK_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("DX_STACK_HOME", str(home))
    return load_stack()


def test_a_broker_started_with_auto_create_on_is_found_stale(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = _load_stack(tmp_path, monkeypatch)
    ports = script.Ports.from_env()
    current = script.kafka_properties(ports)
    assert "auto.create.topics.enable=false\n" in current
    assert script.kafka_settings_changed(ports) == []  # never started: nothing to restart
    script.kafka_config(ports)
    assert script.kafka_settings_changed(ports) == []  # started with today's settings
    (tmp_path / "kafka" / "server.properties").write_text(
        current.replace("auto.create.topics.enable=false", "auto.create.topics.enable=true"))
    assert script.kafka_settings_changed(ports) == ["auto.create.topics.enable: true -> false"]
