"""How every long-running dx command stops (relay, sink run, source run, api serve, alerts run,
inbound serve/pull/watch, console serve).

* The first SIGTERM or SIGINT (Ctrl-C) asks the command to stop: it takes no new work, finishes
  or abandons the work in hand without committing what was not done, and exits 0. That drain
  must fit in the orchestrator's grace period (Kubernetes ``terminationGracePeriodSeconds``,
  Compose ``stop_grace_period``), which the deploy manifests set above a batch's flush time.
* A second one exits the process at once with code 130, for an operator who will not wait (a
  drain stuck on an unreachable broker). Nothing committed is lost: offsets and cursors are
  only ever committed after the work they cover, so the next start redoes what was in hand.

Only commands install handlers; workers and servers take a stop event or flag, so tests and
embedding processes stop them the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_NOW = 130


def _say(line: str) -> None:
    """Straight to fd 2: a handler may run while the main thread is inside a write to
    sys.stderr, and buffered streams refuse a reentrant write."""
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode())


@contextmanager
def graceful_shutdown(*on_stop: Callable[[], object]) -> Iterator[threading.Event]:
    """Within the block, the first SIGTERM/SIGINT sets the yielded event and calls ``on_stop``
    (in the main thread, between two bytecodes: set flags there, do no work); the second exits
    the process now. The previous handlers are back after the block."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            _say(f"dx: {name} again, exiting now")
            os._exit(EXIT_NOW)
        stop.set()
        _say(f"dx: {name}: stopping (send it again to exit now)")
        for callback in on_stop:
            callback()

    # signals reach the main thread only; a command run elsewhere (a test) is stopped by its
    # owner through the same event or flag
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS if main}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def serve_uvicorn(config: Any, *, sockets: list[Any] | None = None,
                  on_stop: tuple[Callable[[], object], ...] = ()) -> None:
    """Run a uvicorn server (``config`` a ``uvicorn.Config``) under :func:`graceful_shutdown`:
    the first signal lets in-flight requests finish, the second exits now. uvicorn's own
    handling is off: it would re-raise the signal after a clean stop and exit non-zero."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    server = Server(config)

    def should_exit() -> None:
        server.should_exit = True

    with graceful_shutdown(should_exit, *on_stop):
        server.run(sockets=sockets)
