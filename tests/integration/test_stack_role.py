"""The stack's database role is not named like dx's schema, and older stacks keep working.

With PostgreSQL's default search_path ("$user", public), a role named `dx` puts every table it
creates without a schema into schema dx once `dx init` has made that schema; `dx capture install`
then says public.TABLE does not exist. The stack's superuser is `shop` now. A cluster made before
(superuser `dx` only) gets the `shop` role from `deploy/local/stack env` or `up`, so an existing
.dx-stack keeps working without being recreated.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration.relay_support import dx, execute, write_config
from tests.stack_script import STACK, load_stack


def test_unqualified_table_after_init_lands_in_public(stack: Any, pg_db: str, topic_prefix: str,
                                                       tmp_path: Path) -> None:
    tables = "  - name: public.widgets\n    columns: [id, name]\n"
    cfg = write_config(tmp_path / "dx.yaml", stack, pg_db, topic_prefix, tables)
    assert dx("init", "-c", str(cfg)).returncode == 0
    execute(pg_db, "CREATE TABLE widgets (id int PRIMARY KEY, name text)")
    with psycopg.connect(pg_db) as conn:
        row = conn.execute("SELECT table_schema FROM information_schema.tables "
                           "WHERE table_name = 'widgets'").fetchone()
        role = conn.execute("SELECT current_user").fetchone()
    assert row == ("public",), f"unqualified CREATE TABLE as role {role} landed in {row}"
    res = dx("capture", "install", "-c", str(cfg))
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------- an older cluster


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def home() -> Iterator[Path]:
    # Not pytest's tmp_path: as root, PostgreSQL runs as `postgres`, which must enter it.
    path = Path(tempfile.mkdtemp(prefix="dx-stack-role-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """The process environment is ``env`` meanwhile: the script reads its settings from it."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_cluster_made_with_role_dx_gets_the_new_role(home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DX_STACK_")}
    env.update(DX_STACK_HOME=str(home), DX_STACK_PG_PORT=str(_free_port()))
    with _environ(env):
        script = load_stack()
        pg_bin = script.pg_bindir()
        if pg_bin is None:
            pytest.skip("no PostgreSQL server binaries (deploy/local/stack up installs them)")
        tools = script.Tools(pg_bin=pg_bin, java="", mvn="")
        user = script.pg_os_user()
        port = int(env["DX_STACK_PG_PORT"])
        # what `up` made before the rename: a cluster whose only superuser is dx
        script.pg_init(tools, user, superuser=(script.LEGACY_USER, script.LEGACY_PASSWORD))
        postgres = script.services(script.Ports.from_env())["postgres"]
        try:
            script.pg_start(tools, postgres, user)
            postgres.wait_ready(script.pg_probe(tools, port))
            _check_env_adds_the_role(env)
        finally:
            postgres.stop()


def _check_env_adds_the_role(env: dict[str, str]) -> None:
    first = subprocess.run([str(STACK), "env"], env=env, capture_output=True, text=True,
                           timeout=60, check=True)
    assert "added the database role shop" in first.stderr
    url = dict(shlex.split(line)[1].split("=", 1) for line in first.stdout.splitlines()
               if line.startswith("export "))["DX_DATABASE_URL"]
    assert url.startswith("postgresql://shop:shop@")
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user, rolsuper FROM pg_roles "
                            "WHERE rolname = current_user").fetchone() == ("shop", True)
    again = subprocess.run([str(STACK), "env"], env=env, capture_output=True, text=True,
                           timeout=60, check=True)
    assert again.stdout == first.stdout and "added" not in again.stderr
