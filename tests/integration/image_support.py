"""A container engine and dx's image for the image tests, made from Debian packages when needed.

No container registry is reachable from the machines dx is developed and tested on, and a fresh
machine has only the docker CLI. So, in order:

* **engine**: one that answers (``DOCKER_HOST``, /var/run/docker.sock, or the one this module
  started before, on its own socket); else Debian's ``docker.io`` (installed with apt-get when
  missing) started here as ``dockerd`` with overlay2 and no bridge network (builds and
  containers use ``--network host``), its socket under /run/dx-test-docker and its data under
  /var/lib/dx-test-docker, left running like deploy/local/stack so the next run reuses it and
  its image cache. Its own socket keeps testcontainers in tests/conftest.py from finding it.
* **base image**: the Dockerfile's default (``python:3.11-slim``) when present or pullable, else
  the machine's Debian release with python3 made with ``mmdebstrap`` and ``docker import``,
  tagged by its package list (``dx-base:<codename>-<hash>``) and reused while it exists.
* **dx's image**: ``deploy/Dockerfile`` built with the classic builder, tagged
  ``dx:<version from pyproject.toml>``, the tag deploy/k8s and deploy/compose.yaml use.

Where no engine can be had at all (not root, no apt, dockerd will not start), ``engine()``
returns the reason in one line and the tests skip with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
RUN_DIR = Path("/run/dx-test-docker")
DATA_ROOT = Path("/var/lib/dx-test-docker")
OWN_SOCKET = RUN_DIR / "docker.sock"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")


class NoEngine(Exception):
    """No container engine can be used here; the message says why, in one line."""


@dataclass(frozen=True)
class Engine:
    docker: str  # the CLI
    host: str  # DOCKER_HOST for it

    def run(self, *args: str, timeout: float = 120, check: bool = True,
            stdin: int | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.docker, *args], capture_output=True, text=True, timeout=timeout, check=False,
            stdin=stdin, env={**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0"})
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args[:3])} failed ({done.returncode}): "
                                 f"{(done.stderr or done.stdout).strip()[-3000:]}")
        return done

    def has_image(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False).returncode == 0


def version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def image_tag() -> str:
    """``dx:<version>``: the one tag convention (README, compose, k8s)."""
    return f"dx:{version()}"


# --------------------------------------------------------------------------- the engine


def _answers(docker: str, host: str) -> bool:
    try:
        done = subprocess.run([docker, "version", "--format", "{{.Server.Version}}"],
                              capture_output=True, text=True, timeout=15, check=False,
                              env={**os.environ, "DOCKER_HOST": host})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


def _apt_install(*packages: str) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise NoEngine(f"{' '.join(packages)} missing and cannot be installed here "
                       "(needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    if done.returncode != 0:  # an old or empty package list: refresh it once
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600,
                       check=False)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900,
                              check=False)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        raise NoEngine(f"apt-get install {' '.join(packages)} failed: {last[0]}")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One process at a time starts the engine or makes the base image."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with (RUN_DIR / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def engine() -> Engine:
    """An engine that answers, started here if need be; raises NoEngine with the reason."""
    docker = shutil.which("docker")
    candidates = [h for h in (os.environ.get("DOCKER_HOST"), "unix:///var/run/docker.sock")
                  if h]
    for host in candidates:
        if docker and _answers(docker, host):
            return Engine(docker, host)
    own = f"unix://{OWN_SOCKET}"
    if os.geteuid() != 0:
        raise NoEngine("no container engine answers and starting dockerd needs root")
    with _locked():
        if docker and _answers(docker, own):
            return Engine(docker, own)
        if shutil.which("dockerd") is None or docker is None:
            _apt_install("docker.io")
            docker = shutil.which("docker")
        if docker is None or shutil.which("dockerd") is None:
            raise NoEngine("docker.io is installed but docker/dockerd are not on PATH")
        _start_dockerd()
        deadline = time.monotonic() + 90
        while not _answers(docker, own):
            if time.monotonic() > deadline:
                raise NoEngine(f"dockerd did not answer within 90s: {_last_line(_log())}")
            time.sleep(0.5)
    return Engine(docker, own)


def _log() -> Path:
    return DATA_ROOT.with_suffix(".log")


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1][-300:]
    return f"see {path}"


def _start_dockerd() -> None:
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    OWN_SOCKET.unlink(missing_ok=True)
    argv = [
        shutil.which("dockerd") or "dockerd",
        "--host", f"unix://{OWN_SOCKET}",
        "--data-root", str(DATA_ROOT),
        "--exec-root", str(RUN_DIR / "exec"),
        "--pidfile", str(RUN_DIR / "dockerd.pid"),
        "--storage-driver", "overlay2",
        # No bridge (creating one needs iptables and kernel modules a sandbox may not have):
        # builds and containers run with --network host.
        "--bridge", "none", "--iptables=false", "--ip6tables=false",
    ]
    with _log().open("ab") as out:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                         start_new_session=True)  # outlives the test session, like the stack


# --------------------------------------------------------------------------- images


def _default_base() -> str:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("ARG PYTHON_IMAGE="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("deploy/Dockerfile has no ARG PYTHON_IMAGE default")


def _codename() -> str:
    return platform.freedesktop_os_release().get("VERSION_CODENAME", "bookworm")


def base_image(eng: Engine) -> str:
    """The base image to build on: the default one if it can be had, else a Debian one."""
    default = _default_base()
    if eng.has_image(default):
        return default
    codename = _codename()
    digest = hashlib.sha256(" ".join((codename, *BASE_PACKAGES)).encode()).hexdigest()[:12]
    local = f"dx-base:{codename}-{digest}"
    if eng.has_image(local):
        return local
    if eng.run("pull", default, check=False, timeout=120).returncode == 0:
        return default
    with _locked():
        if not eng.has_image(local):
            _debian_base(eng, codename, local)
    return local


def _debian_base(eng: Engine, codename: str, tag: str) -> None:
    if shutil.which("mmdebstrap") is None:
        _apt_install("mmdebstrap")
    with tempfile.TemporaryDirectory(prefix="dx-base-", dir="/var/tmp") as tmp:
        tar = Path(tmp) / "rootfs.tar"
        made = subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             "--format=tar", codename, str(tar)],
            capture_output=True, text=True, timeout=1200, check=False)
        if made.returncode != 0:
            raise AssertionError(f"mmdebstrap {codename} failed: {made.stderr.strip()[-2000:]}")
        with tar.open("rb") as rootfs:
            eng.run("import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]',
                    "-", tag, stdin=rootfs.fileno(), timeout=600)


def build_image(eng: Engine) -> str:
    """Build deploy/Dockerfile as dx:<version>; the layer cache makes a rebuild cheap."""
    tag = image_tag()
    args = ["build", "--network", "host", "-f", str(DOCKERFILE),
            "--build-arg", f"PYTHON_IMAGE={base_image(eng)}"]
    # The index and CA bundle pip uses here (a mirror, a TLS-inspecting proxy) reach the build
    # the documented way: the CA as a file in the build context (.dx-build/, git-ignored).
    if os.environ.get("PIP_INDEX_URL"):
        args += ["--build-arg", f"PIP_INDEX_URL={os.environ['PIP_INDEX_URL']}"]
    ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if ca and Path(ca).is_file():
        bundle = REPO / ".dx-build" / "ca-bundle.pem"
        bundle.parent.mkdir(exist_ok=True)
        if not bundle.exists() or bundle.read_bytes() != Path(ca).read_bytes():
            shutil.copyfile(ca, bundle)
        args += ["--build-arg", f"CA_BUNDLE={bundle.relative_to(REPO)}"]
    # The build stage is tagged too, so pruning what earlier builds left behind (dangling
    # images: a few hundred MB per code change) keeps the cached dependency layers.
    eng.run(*args, "--target", "build", "-t", f"dx-build-cache:{version()}", str(REPO),
            timeout=1500)
    eng.run(*args, "-t", tag, str(REPO), timeout=600)
    eng.run("image", "prune", "--force", check=False)
    return tag


def inspect(eng: Engine, ref: str) -> dict[str, object]:
    found = json.loads(eng.run("inspect", ref).stdout)
    assert isinstance(found, list) and found
    return dict(found[0])
