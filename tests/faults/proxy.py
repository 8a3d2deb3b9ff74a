"""A TCP proxy for the fault tier, on loopback: what a network does to dx's connections.

``Proxy(port)`` listens on 127.0.0.1 (a free port) and forwards every connection to
``127.0.0.1:port``. While running it can

* ``blackhole()``: stop moving bytes both ways and leave every connection open, new ones
  included (a partition, or a half-open connection behind a middlebox: the peer's kernel still
  acknowledges, nothing answers);
* ``cut()``: reset every open connection and refuse new ones (a crashed peer, a firewall
  rejecting);
* ``delay(seconds)``: hold each chunk that long before passing it on;
* ``heal()``: back to passing bytes (connections a cut reset stay gone).

It runs an asyncio loop in a daemon thread, so tests drive it from ordinary code."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


class Proxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode = "pass"
        self.delay_s = 0.0
        self.connections = 0  # accepted so far
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        started.wait(10)
        assert self._server is not None, "the proxy did not start"
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            started.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode == "cut":
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(writer)
            return
        self._open |= {writer, up_writer}
        pumps = [asyncio.ensure_future(self._pump(reader, up_writer)),
                 asyncio.ensure_future(self._pump(up_reader, writer))]
        # either side closing ends the connection both ways, as a real peer's exit does
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        for w in (writer, up_writer):
            self._open.discard(w)
            _abort(w)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            while self.mode == "blackhole":
                await asyncio.sleep(0.05)
            if self.mode == "cut" or writer.is_closing():
                return
            try:
                data = await reader.read(65536)
            except OSError:
                return
            if not data:
                return
            while self.mode == "blackhole":  # a chunk caught in the partition waits with it
                await asyncio.sleep(0.05)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.mode == "cut":
                return
            writer.write(data)
            await writer.drain()

    def _call(self, fn: Any) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(10)

    def blackhole(self) -> None:
        self._call(lambda: setattr(self, "mode", "blackhole"))

    def cut(self) -> None:
        def do() -> None:
            self.mode = "cut"
            for w in list(self._open):
                _abort(w)
            self._open.clear()
        self._call(do)

    def delay(self, seconds: float) -> None:
        self._call(lambda: setattr(self, "delay_s", seconds))

    def heal(self) -> None:
        def do() -> None:
            self.mode, self.delay_s = "pass", 0.0
        self._call(do)

    def close(self) -> None:
        def do() -> None:
            self.mode = "cut"
            for w in list(self._open):
                _abort(w)
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
        self._call(do)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _abort(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()
