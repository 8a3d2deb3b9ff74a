"""deploy/compose.yaml cannot be started on a machine without Docker; these checks keep it
consistent with the rest of the repository: every dx role is there, built from our Dockerfile,
configured from the demo dx.yaml whose every ${VAR} the services set, ports on 127.0.0.1."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"


def _services() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def test_stack_services_start_without_a_profile_and_exchange_with_one() -> None:
    services = _services()
    assert {"postgres", "kafka", "registry"} <= {n for n, s in services.items()
                                                 if "profiles" not in s}
    roles = {n: s for n, s in services.items() if s.get("profiles") == ["exchange"]}
    commands = [s.get("command", []) for s in roles.values()]
    assert ["relay"] in commands
    assert any(c[:2] == ["sink", "run"] for c in commands)
    assert any(c[:2] == ["source", "run"] for c in commands)
    assert ["alerts", "run"] in commands
    assert ["inbound", "serve"] in commands and ["inbound", "pull", "pim-inbound"] in commands
    assert roles["relay"]["deploy"]["replicas"] == 2  # active + hot standby
    build = roles["dx-setup"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()


def test_every_variable_of_the_demo_config_is_set_for_the_workers() -> None:
    services = _services()
    env = services["relay"]["environment"]
    used = set(re.findall(r"\$\{(\w+)", (ROOT / "deploy/demo/dx.yaml").read_text()))
    assert used <= set(env), used - set(env)
    for name in ("relay", "sink-pim", "source-pim", "dx-setup", "alerts", "inbound-pull",
                 "inbound"):
        assert services[name]["environment"].items() >= env.items()
        assert any(v.endswith(":/etc/dx/dx.yaml:ro") for v in services[name]["volumes"])


def test_published_ports_are_loopback_only() -> None:
    for name, svc in _services().items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
