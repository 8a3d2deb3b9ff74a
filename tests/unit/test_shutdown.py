"""One shutdown for every long-running command (pipeline/cli/shutdown.py): the first SIGTERM
drains and exits 0, a second one exits at once with 130, and no other module handles them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A command whose drain takes ``DRAIN`` seconds after the first signal (forever: -1).
PROGRAM = """
import sys, time
from pipeline.cli.shutdown import graceful_shutdown

drain = float(sys.argv[1])
with graceful_shutdown(lambda: print("on_stop", flush=True)) as stop:
    print("ready", flush=True)
    while not stop.wait(0.05):
        pass
    print("draining", flush=True)
    deadline = time.monotonic() + drain
    while drain < 0 or time.monotonic() < deadline:
        time.sleep(0.05)
print("drained", flush=True)
"""


def start(drain: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM, str(drain)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def wait_for_line(proc: subprocess.Popen[str], want: str) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline().strip()
        if line == want:
            return
        assert line, f"exited before {want!r}: {proc.wait()} {proc.stderr.read()}"  # type: ignore[union-attr]
    raise AssertionError(f"no {want!r}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_drains_and_exits_zero(sig: signal.Signals) -> None:
    proc = start(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.split() == ["on_stop", "draining", "drained"]
    assert err.strip() == f"dx: {sig.name}: stopping (send it again to exit now)"


def test_second_signal_exits_now_without_finishing_the_drain() -> None:
    proc = start(-1)  # a drain that never ends (a broker that does not answer)
    proc.send_signal(signal.SIGTERM)
    wait_for_line(proc, "draining")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "drained" not in out
    assert err.splitlines() == ["dx: SIGTERM: stopping (send it again to exit now)",
                                "dx: SIGTERM again, exiting now"]


def test_no_other_module_handles_stop_signals() -> None:
    """Every command goes through graceful_shutdown; SIGHUP (api reload) is not a stop."""
    offenders = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if path.name == "shutdown.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "signal.signal(" in line and "SIGHUP" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
