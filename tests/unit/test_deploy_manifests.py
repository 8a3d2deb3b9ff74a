"""Offline checks of deploy/: the Kubernetes manifests, the Dockerfile and .dockerignore.

No cluster and no Docker engine here, so the checks are:
- every manifest against the Kubernetes OpenAPI schemas (``kubernetes-validate``, which ships
  them; strict: unknown fields fail), skipped when that package is not installed;
- the kustomization renders with kustomize (``kubectl kustomize``, a ``kustomize`` on PATH, or
  kustomize built from the Go module proxy into a cache, see ``kustomize()``) and what it renders
  validates too;
- one image tag everywhere: ``dx:<version>`` in the README, compose and the kustomization;
- the operational rules the issue asks for, read from the YAML (non-root, probes, grace period,
  standby relay, scrape annotations, placeholder secrets);
- the ``dx.yaml`` in the ConfigMap loads with the current configuration model and every route a
  Deployment runs exists in it;
- every COPY source of the Dockerfile exists and is let through by .dockerignore.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
METRICS_PORT = 9400
KUBERNETES_VERSION = "1.29.0"  # the oldest minor the manifests promise to work on
KUSTOMIZE_MODULE = "sigs.k8s.io/kustomize/kustomize/v5@v5.5.0"
WORKERS = ["relay:default", "sink:pim-products", "source:pim-inbound",
           "inbound-pull:pim-inbound"]


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


def kustomize() -> list[str]:
    """A kustomize command: kubectl's built-in one, a kustomize on PATH, or kustomize built once
    from the Go module proxy into ~/.cache/dx-tools (a minute or two, then reused)."""
    if shutil.which("kubectl"):
        probe = subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True,
                               timeout=60, check=False)
        if probe.returncode == 0:
            return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    gobin = Path.home() / ".cache" / "dx-tools" / KUSTOMIZE_MODULE.rsplit("@", 1)[1]
    built = gobin / "kustomize"
    if not built.exists():
        if shutil.which("go") is None:
            pytest.skip("no kustomize: neither kubectl, kustomize nor Go to build it")
        done = subprocess.run(["go", "install", KUSTOMIZE_MODULE], capture_output=True,
                              text=True, timeout=1200, check=False,
                              env={**os.environ, "GOBIN": str(gobin)})
        assert done.returncode == 0, f"go install {KUSTOMIZE_MODULE}: {done.stderr[-2000:]}"
    return [str(built), "build"]


def rendered() -> list[dict[str, Any]]:
    out = subprocess.run([*kustomize(), str(K8S)], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_kustomization_renders_and_validates() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    docs = rendered()
    assert [d["kind"] for d in docs].count("Deployment") == len(resources("Deployment"))
    for doc in docs:
        assert doc["metadata"].get("namespace", "dx") == "dx"
        kv.validate(doc, KUBERNETES_VERSION, strict=True)
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            for c in pod.get("initContainers", []) + pod["containers"]:
                assert c["image"] == image_tag()


def image_tag() -> str:
    """``dx:<version>``: the one tag convention."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return f"dx:{version}"


def test_one_image_tag_everywhere() -> None:
    tag = image_tag()
    name, version = tag.split(":")
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {"name": name, "newName": name, "newTag": version} in kustomization["images"]
    for dep in resources("Deployment"):
        pod = dep["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert c["image"] == tag, dep["metadata"]["name"]
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]
    for svc_name, svc in compose.items():
        if "build" in svc or svc.get("image", "").startswith(f"{name}:"):
            assert svc["image"] == tag, svc_name
    docs = (ROOT / "README.md").read_text() + DOCKERFILE.read_text()
    used = set(re.findall(r"(?:-t|docker run(?: --rm)?) (dx(?::[\w.-]+)?)\b", docs))
    assert used == {tag}, f"image tags in README/Dockerfile: {used}"


# -- operational rules ----------------------------------------------------------------------


def test_one_deployment_per_role_relay_with_standby() -> None:
    deps = deployments()
    roles = {key.split(":")[0] for key in deps}
    assert roles == {"relay", "sink", "source", "api", "alerts", "inbound", "inbound-pull",
                     "console"}
    relay = deps["relay:default"]
    assert relay["spec"]["replicas"] == 2  # active + hot standby
    rolling = relay["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0


def hardened_pod(key: str) -> dict[str, Any]:
    """The rules every dx pod keeps (the image test runs containers the same way); its spec."""
    dep = deployments()[key]
    pod: dict[str, Any] = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
        assert {"secretRef": {"name": "dx-secrets"}} in c["envFrom"]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/etc/dx", "/tmp"} <= mounts  # read-only root: /tmp is the only writable place
    return pod


@pytest.mark.parametrize(("key", "args", "env_prefix", "port", "health"), [
    ("api:default", ["api", "serve"], "DX_API", 8080, "/-/health"),
    ("inbound:default", ["inbound", "serve"], "DX_INBOUND", 8088, "/healthz"),
    ("console:default", ["console", "serve"], "DX_CONSOLE", 8091, "/healthz"),
])
def test_http_servers_have_a_service_and_probes(key: str, args: list[str], env_prefix: str,
                                                port: int, health: str) -> None:
    (main,) = hardened_pod(key)["containers"]
    assert main["args"] == args
    env = {e["name"]: e["value"] for e in main["env"]}
    assert env[f"{env_prefix}_HOST"] == "0.0.0.0" and env[f"{env_prefix}_PORT"] == str(port)
    assert main["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"] == {"path": health, "port": "http"}
    name = deployments()[key]["metadata"]["name"]
    (svc,) = [s for s in resources("Service") if s["metadata"]["name"] == name]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_alerts_pod() -> None:
    alerts = deployments()["alerts:default"]
    assert alerts["spec"]["replicas"] == 1 and alerts["spec"]["strategy"]["type"] == "Recreate"
    assert hardened_pod("alerts:default")["containers"][0]["args"] == ["alerts", "run"]


@pytest.mark.parametrize("key", WORKERS)
def test_pod_spec_is_operable(key: str) -> None:
    dep = deployments()[key]
    pod = hardened_pod(key)
    assert pod["terminationGracePeriodSeconds"] >= 60
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    (main,) = pod["containers"]
    env = {e["name"]: e["value"] for e in main["env"]}
    assert env["DX_METRICS_PORT"] == str(METRICS_PORT)
    assert env["DX_CONFIG"] == "/etc/dx/dx.yaml"
    assert main["ports"] == [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"].startswith("/readyz")
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_metrics_service_selects_every_worker() -> None:
    (svc,) = [s for s in resources("Service") if s["metadata"]["name"] == "dx-metrics"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert svc["spec"]["ports"][0]["port"] == METRICS_PORT
    for key in WORKERS:
        labels = deployments()[key]["spec"]["template"]["metadata"]["labels"]
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
        elif args[0] == "api":
            assert args == ["api", "serve"] and config.api is not None and config.api.entities
        elif args[0] == "alerts":
            assert args == ["alerts", "run"] and config.alerts is not None
        elif args[:2] == ["inbound", "serve"]:
            assert any(r.inbound and r.inbound.webhook for r in config.sources)
        elif args[0] == "console":
            assert args == ["console", "serve"]
        elif args[:2] == ["inbound", "pull"]:
            (route,) = [r for r in config.sources if r.name == args[2]]
            assert route.inbound is not None and route.inbound.pull is not None
        else:
            assert args == ["relay"]


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
        if src.startswith("${"):
            continue  # an optional build arg (CA_BUNDLE): empty by default
        assert dockerignore_allows(src), f".dockerignore drops {src}"
        if src == "README.md":
            continue  # written with the README work; pyproject's `readme` needs it anyway
        assert (ROOT / src).exists(), f"COPY {src}: no such file"
    assert not dockerignore_allows("tests/unit/test_deploy_manifests.py")
    assert not dockerignore_allows("pipeline/__pycache__/x.pyc")
    assert not dockerignore_allows(".git/config")
