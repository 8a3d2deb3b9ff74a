"""A Kafka broker of the fault tier's own, behind the tier's TCP proxy, so a test may kill,
restart, partition or half-open it (never the shared stack's broker).

A broker tells its clients where to connect (``advertised.listeners``), so a proxy can sit in
front of it only if the broker advertises the proxy: this one listens on a free port and
advertises the proxy's. It is the stack's own broker (``deploy/local/stack``: same jars, same
KRaft settings, same launch command), one combined node in a temporary directory, started once
per session; clients bootstrap through ``proxy.address`` and so every byte crosses the proxy."""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from confluent_kafka.admin import AdminClient

from tests.faults.own_postgres import _free_port
from tests.faults.proxy import Proxy

STACK = Path(__file__).resolve().parents[2] / "deploy" / "local" / "stack"


def _stack_module() -> ModuleType:
    """``deploy/local/stack`` as a module (a script without ``.py``): its Kafka download,
    configuration and launch command, so the tier's broker is configured like the stack's."""
    loader = importlib.machinery.SourceFileLoader("dx_local_stack", str(STACK))
    spec = importlib.util.spec_from_loader("dx_local_stack", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    loader.exec_module(module)
    return module


class OwnKafka:
    def __init__(self) -> None:
        stack = _stack_module()
        tools = stack.ensure_tools()
        libs = stack.fetch_kafka(tools)  # the stack's jars (downloaded once, then reused)
        self.root = Path(tempfile.mkdtemp(prefix="dx-faults-kafka-"))
        self.port = _free_port()
        self.proxy = Proxy(self.port)
        # the stack's settings, written under our directory instead of the stack's
        stack.STATE = self.root
        ports = stack.Ports(pg=0, kafka=self.port, controller=_free_port(), registry=0,
                            registry_management=0)
        config: Path = stack.kafka_config(ports)
        lines = [ln for ln in config.read_text().splitlines()
                 if not ln.startswith("advertised.listeners=")]
        lines.append(f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.proxy.port}")
        # Killed a second after creating partitions, this single node took them for strays on
        # restart and deleted them (seen with __consumer_offsets; cf. KAFKA-16814: a partition's
        # files are flushed lazily). A real cluster recovers them from a replica; this one
        # flushes every second so the drills test dx, not that window.
        lines += ["log.flush.interval.ms=1000", "log.flush.scheduler.interval.ms=1000"]
        config.write_text("\n".join(lines) + "\n")
        self._argv: list[str] = stack.kafka_java(tools, libs, ["kafka.Kafka", str(config)],
                                                 "384m")
        fmt = stack.kafka_java(tools, libs, ["kafka.tools.StorageTool", "format", "-t",
                                             "dxfaultskafka0000000A", "-c", str(config)], "256m")
        subprocess.run(fmt, check=True, capture_output=True, timeout=300)
        self.log = self.root / "kafka.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def bootstrap(self) -> str:
        return self.proxy.address

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=self.root,
                                         start_new_session=True)
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Until the broker answers metadata through the proxy with a leader for a topic."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, \
                f"the tier's Kafka broker exited; see {self.log}"
            with contextlib.suppress(Exception):
                if admin.list_topics(timeout=2).brokers:
                    return
            time.sleep(0.3)
        raise AssertionError(f"the tier's Kafka broker did not start; see {self.log}")

    def stop(self, how: str = "graceful") -> None:
        """``graceful`` (SIGTERM: a controlled shutdown) or ``kill`` (SIGKILL: a crash, log
        recovery on the next start)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGKILL if how == "kill" else signal.SIGTERM)
        proc.wait(120)

    def restart(self, how: str, down_s: float = 1.0) -> None:
        self.stop(how)
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("kill")
        self.proxy.close()
        shutil.rmtree(self.root, ignore_errors=True)
