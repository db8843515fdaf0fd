"""A TCP proxy on loopback that delays what it forwards: a slow network between a client and a server, for
chaos tests (e.g. a Redis that answers, but late).

::

    from ragguard.testing.redis_server import RedisServer
    from ragguard.testing._tcp_proxy import TcpProxy

    with RedisServer() as server, TcpProxy(server.host, server.port) as proxy:
        backend = ragguard.RedisBackend(proxy.url("redis"), timeout=0.2)
        proxy.set_delay(0.05, 0.15)   # every chunk, each way, 50-150 ms late from now on
        ...
        proxy.set_delay(0.0)          # a healthy network again

Every chunk read from one side is written to the other ``delay`` seconds after it was read, ``delay`` drawn
uniformly from ``[low, high]`` per chunk (seeded), never before an earlier chunk of the same direction (the byte
order of a TCP stream is kept). A round trip therefore takes two delays. Changing the delay affects chunks read
from then on. An end of stream is forwarded (half-close) in order, like data; a reset or error on one side
closes both.

The proxy runs its own asyncio event loop in a daemon thread, so its timing does not depend on the event loop
(asyncio or trio) of the code under test, and it can be driven from any thread. It binds loopback addresses
only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from types import TracebackType

from ._loopback import check_loopback

__all__ = ["TcpProxy"]

_CHUNK = 65536


def _check_loopback(host: str) -> None:
    check_loopback(host, "the proxy only uses")


class TcpProxy:
    """Forward a loopback port to ``target_host:target_port``, delaying every chunk (see the module doc).

    Args:
        target_host: the server's address (loopback only).
        target_port: the server's port.
        host: the loopback address the proxy listens on.
        low, high: the initial delay range in seconds (``0 <= low <= high``); default none.
        seed: seed of the per-chunk delay draws.

    Attributes:
        port: the port the proxy listens on (after :meth:`start`).
        accepted: connections accepted so far.
        open_connections: client connections open now (for leak checks).
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        low: float = 0.0,
        high: float | None = None,
        seed: int = 0,
    ) -> None:
        _check_loopback(target_host)
        _check_loopback(host)
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0
        self.accepted = 0
        self.open_connections = 0
        self._low = 0.0
        self._high = 0.0
        self.set_delay(low, high)
        self._rng = random.Random(seed)  # delays, not secrets
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (
            f"TcpProxy({self.host}:{self.port} -> {self.target_host}:{self.target_port}, "
            f"delay {self._low:g}-{self._high:g} s, {self.open_connections} open)"
        )

    # --- control (any thread) ---------------------------------------------------------------------------

    @property
    def delay(self) -> tuple[float, float]:
        """The current delay range ``(low, high)`` in seconds."""
        return self._low, self._high

    def set_delay(self, low: float, high: float | None = None) -> None:
        """Delay every chunk read from now on by ``uniform(low, high)`` seconds (``high`` defaults to ``low``).

        Raises:
            ValueError: a negative, non-finite or inverted range.
        """
        top = low if high is None else high
        if not (0.0 <= low <= top < float("inf")):
            raise ValueError(f"the delay range must satisfy 0 <= low <= high < inf, got {low!r}, {high!r}")
        # one tuple assignment: a reader in the proxy's thread never sees a half-changed range
        self._low, self._high = float(low), float(top)

    def url(self, scheme: str = "redis", path: str = "/0") -> str:
        """``SCHEME://HOST:PORT PATH`` of the proxy (e.g. ``redis://127.0.0.1:5678/0``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{path}"

    # --- lifecycle --------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> TcpProxy:
        """Start listening (in a daemon thread). Returns ``self``.

        Raises:
            RuntimeError: already started, or the listener did not come up within ``timeout`` seconds.
        """
        if self._thread is not None:
            raise RuntimeError(f"{self!r} was already started")
        self._thread = threading.Thread(target=self._run, name="ragguard-tcp-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the TCP proxy did not start: {self._error!r}")
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Close the listener and every connection, and stop the thread. Idempotent."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- the proxy's own thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        # the connection lives in a task of our own, which close() cancels (asyncio's streams would log the
        # cancellation of their handler task as an error)
        task = asyncio.create_task(self._handle(client_reader, client_writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open_connections += 1
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                return  # the server is down: the client sees its connection closed, as without a proxy
            pumps = [
                asyncio.create_task(self._pump(client_reader, upstream_writer)),
                asyncio.create_task(self._pump(upstream_reader, client_writer)),
            ]
            try:
                done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
                if any(not t.cancelled() and t.exception() is not None for t in done):
                    return  # a reset or error on one side: close both at once
                await asyncio.gather(*pumps)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.transport.abort()
            self.open_connections -= 1

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction, each chunk written ``delay`` after it was read, in order; then half-close."""
        loop = asyncio.get_running_loop()
        # (due, chunk); an empty chunk is the end of the stream, None a failed read
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

        async def read() -> None:
            last_due = 0.0
            while True:
                try:
                    data: bytes | None = await reader.read(_CHUNK)
                except OSError:
                    data = None
                low, high = self._low, self._high
                delay = low if high <= low else self._rng.uniform(low, high)
                due = max(last_due, loop.time() + delay)
                last_due = due
                queue.put_nowait((due, data))
                if not data:
                    return

        reading = asyncio.create_task(read())
        try:
            while True:
                due, data = await queue.get()
                if data is None:
                    raise ConnectionResetError("the other side of the proxied connection failed")
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        finally:
            reading.cancel()
            # gather returns the reader's own cancellation; a cancellation of this task still propagates
            await asyncio.gather(reading, return_exceptions=True)
