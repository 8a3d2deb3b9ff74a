"""Offline checks of deploy/: the Kubernetes manifests, the Dockerfile and .dockerignore.

No cluster and no Docker engine here, so the checks are:
- every manifest against the Kubernetes OpenAPI schemas (``kubernetes-validate``, which ships
  them; strict: unknown fields fail), skipped when that package is not installed;
- the kustomization builds with ``kubectl kustomize`` when kubectl is installed (no cluster needed);
- the operational rules the issue asks for, read from the YAML (non-root, probes, grace period,
  standby relay, scrape annotations, placeholder secrets);
- the ``dx.yaml`` in the ConfigMap loads with the current configuration model and every route a
  Deployment runs exists in it;
- every COPY source of the Dockerfile exists and is let through by .dockerignore.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
METRICS_PORT = 9400
KUBERNETES_VERSION = "1.29.0"  # the oldest minor the manifests promise to work on


def manifests() -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def resources(kind: str) -> list[dict[str, Any]]:
    return [d for docs in manifests().values() for d in docs if d["kind"] == kind]


def deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["labels"]["app.kubernetes.io/component"] + ":"
            + d["metadata"]["labels"]["app.kubernetes.io/instance"]: d
            for d in resources("Deployment")}


def dx_yaml() -> str:
    (cm,) = [c for c in resources("ConfigMap") if c["metadata"]["name"] == "dx-config"]
    return str(cm["data"]["dx.yaml"])


def placeholder_env() -> dict[str, str]:
    (secret,) = resources("Secret")
    return {k: str(v) for k, v in secret["stringData"].items()}


# -- structure ------------------------------------------------------------------------------


def test_every_manifest_is_well_formed_and_in_the_kustomization() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    found = set(manifests())
    assert listed == found, f"not listed: {found - listed}; missing files: {listed - found}"
    for name, docs in manifests().items():
        assert docs, f"{name} is empty"
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), name
            assert doc["metadata"].get("name"), name
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == kustomization["namespace"], name


def test_manifests_match_the_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for name, docs in manifests().items():
        for doc in docs:
            try:
                kv.validate(doc, KUBERNETES_VERSION, strict=True)
            except kv.ValidationError as err:  # pragma: no cover - the failure message
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {err}")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomization_builds() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout) if d]
    assert kinds.count("Deployment") == 4


# -- operational rules ----------------------------------------------------------------------


def test_one_deployment_per_role_relay_with_standby() -> None:
    deps = deployments()
    roles = {key.split(":")[0] for key in deps}
    assert roles == {"relay", "sink", "source", "console"}
    relay = deps["relay:default"]
    assert relay["spec"]["replicas"] == 2  # active + hot standby
    rolling = relay["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0


@pytest.mark.parametrize("key", ["relay:default", "sink:pim-products", "source:pim-inbound",
                                 "console:default"])
def test_pod_spec_is_operable(key: str) -> None:
    dep = deployments()[key]
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
        assert {"secretRef": {"name": "dx-secrets"}} in c["envFrom"]
    (main,) = pod["containers"]
    env = {e["name"]: e["value"] for e in main["env"]}
    assert env["DX_METRICS_PORT"] == str(METRICS_PORT)
    assert env["DX_CONFIG"] == "/etc/dx/dx.yaml"
    assert main["ports"] == [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"].startswith("/readyz")
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"
    mounts = {m["mountPath"] for m in main["volumeMounts"]}
    assert {"/etc/dx", "/tmp"} <= mounts  # read-only root: /tmp is the only writable place


def test_metrics_service_selects_every_worker() -> None:
    (svc,) = [s for s in resources("Service") if s["metadata"]["name"] == "dx-metrics"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert svc["spec"]["ports"][0]["port"] == METRICS_PORT
    for dep in deployments().values():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()


def test_secret_holds_placeholders_for_every_variable_of_dx_yaml() -> None:
    env = placeholder_env()
    needed = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", dx_yaml()))
    assert needed <= env.keys(), f"missing in secret.yaml: {needed - env.keys()}"
    for key, value in env.items():
        assert "CHANGE-ME" in value or ".example." in value, f"{key} looks like a real value"


def test_configmap_dx_yaml_loads_and_runs_the_deployed_routes(tmp_path: Path) -> None:
    from pipeline.config import load_config

    path = tmp_path / "dx.yaml"
    path.write_text(dx_yaml())
    config = load_config(path, env=placeholder_env())
    sinks = {r.name for r in config.sinks}
    sources = {r.name for r in config.sources}
    for dep in deployments().values():
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        if args[0] == "sink":
            assert args[1:] == ["run", args[2]] and args[2] in sinks
        elif args[0] == "source":
            assert args[1:] == ["run", args[2]] and args[2] in sources
        else:
            assert args in (["relay"], ["console", "serve"])


# -- Dockerfile -----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_a_small_non_root_image_for_every_role() -> None:
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    froms = [a for w, a in ins if w == "FROM"]
    assert len(froms) == 2, "multi-stage: build, then runtime"
    assert all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert ("ENTRYPOINT", '["dx"]') in ins
    assert ("STOPSIGNAL", "SIGTERM") in ins
    assert ("EXPOSE", str(METRICS_PORT)) in ins
    (health,) = [a for w, a in ins if w == "HEALTHCHECK"]
    assert "/healthz" in health and "DX_METRICS_PORT" in health
    runtime = ins[[i for i, (w, _) in enumerate(ins) if w == "FROM"][-1]:]
    assert not any(w == "COPY" and "--from" not in a and a.split()[0] in ("pipeline", ".")
                   for w, a in runtime), "the runtime stage gets the built venv, not sources"


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a directory exception covers its files."""
    allowed = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or (
                pattern.startswith("**/") and any(fnmatch.fnmatch(x, pattern[3:]) for x in parts)):
            allowed = negate
    return allowed


def test_dockerfile_copy_sources_exist_and_are_in_the_context() -> None:
    sources = []
    for word, rest in dockerfile_instructions():
        if word == "COPY" and "--from" not in rest:
            sources.extend(rest.split()[:-1])
    assert "pipeline" in sources and "pyproject.toml" in sources
    for src in sources:
        assert dockerignore_allows(src), f".dockerignore drops {src}"
        if src == "README.md":
            continue  # written with the README work; pyproject's `readme` needs it anyway
        assert (ROOT / src).exists(), f"COPY {src}: no such file"
    assert not dockerignore_allows("tests/unit/test_deploy_manifests.py")
    assert not dockerignore_allows("pipeline/__pycache__/x.pyc")
    assert not dockerignore_allows(".git/config")
