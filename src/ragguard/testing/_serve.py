"""Serve an ASGI app with uvicorn on a free loopback port, in a background thread or a child process.

::

    with serve(OpenAISimulator()) as served:                  # sync, thread mode
        client = OpenAI(base_url=served.base_url, api_key="sk-test")

    async with aserve(OpenAISimulator(), mode="process") as served:   # async (asyncio or trio), child process
        ...
        print(served.stats())

Thread mode runs ``uvicorn.Server`` on its own event loop in a daemon thread. Process mode runs the app in a
child Python process (so a load generator and the simulator use different cores); it needs an app that knows
how to start itself there (:class:`ProcessServable`), e.g. :class:`~ragguard.testing.OpenAISimulator`. The
child prints its port on stdout and exits when its stdin closes, so it never outlives the parent.

Only loopback addresses are accepted: a simulator is a test fixture, never a public server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

import anyio
import anyio.to_thread
import uvicorn
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ._loopback import check_loopback

__all__ = [
    "CLOSE_CONNECTION_EXTENSION",
    "ProcessServable",
    "ServeMode",
    "Served",
    "aserve",
    "run_foreground",
    "serve",
]

ServeMode = Literal["thread", "process"]
AppT = TypeVar("AppT")

#: ASGI scope extension under which the served app finds a callable that closes the client's connection
#: at once (no response, or a response cut short): how the simulators inject connection drops.
CLOSE_CONNECTION_EXTENSION = "ragguard.close_connection"


@runtime_checkable
class ProcessServable(Protocol):
    """An app that can be served in a child process.

    ``subprocess_argv`` returns the full command (interpreter included) that serves an equivalent app on
    ``host:port``, prints the bound port as the first line of stdout once accepting, and exits when stdin
    closes. ``parse_stats`` turns the body of ``GET /_sim/stats`` into the app's stats object.
    """

    def subprocess_argv(self, host: str, port: int) -> list[str]: ...

    def parse_stats(self, payload: bytes) -> Any: ...


def _check_loopback(host: str) -> None:
    check_loopback(host, "the simulator only binds")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio only sets TCP_NODELAY on accepted sockets whose proto is IPPROTO_TCP, and
    # without it Nagle + delayed ACKs add ~40 ms to every response written in two parts.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _ClosableH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a scope extension that lets the app close the connection at once.

    ASGI has no way to drop a connection without answering (an app that returns without a response gets a 500
    from uvicorn), so the protocol hands the app its transport's ``close``.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        inner = self.app

        def close() -> None:
            transport.close()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            extensions = dict(scope.get("extensions") or {})
            extensions[CLOSE_CONNECTION_EXTENSION] = close
            scope["extensions"] = extensions
            await inner(scope, receive, send)

        self.app = app


def _uvicorn_config(app: ASGIApp, *, shutdown_timeout: float, configure_logging: bool) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=_ClosableH11Protocol,
        lifespan="off",
        loop="asyncio",
        log_level="warning",
        # In thread mode the host process owns logging: only set uvicorn's levels, install no handlers.
        log_config=uvicorn.config.LOGGING_CONFIG if configure_logging else None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=max(1, math.ceil(shutdown_timeout)),
        backlog=4096,
    )


class _Runner(Protocol):
    def start(self, timeout: float) -> tuple[str, int]: ...

    def stop(self) -> None: ...


class _ThreadRunner:
    def __init__(self, app: ASGIApp, host: str, port: int, shutdown_timeout: float) -> None:
        self._sock = _bind(host, port)
        self._host = host
        self._server = uvicorn.Server(_uvicorn_config(app, shutdown_timeout=shutdown_timeout, configure_logging=False))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ragguard-simulator", daemon=True)

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as exc:  # reported to the starting thread; SystemExit included
            self._error = exc

    def start(self, timeout: float) -> tuple[str, int]:
        port = int(self._sock.getsockname()[1])
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn did not start on {self._host}:{port}") from self._error
            time.sleep(0.002)
        return self._host, port

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=30.0)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=5.0)
        self._sock.close()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The child must import this very copy of ragguard even when it is not installed.
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class _ProcessRunner:
    def __init__(self, app: ProcessServable, host: str, port: int) -> None:
        self._argv = app.subprocess_argv(host, port)
        self._host = host
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float) -> tuple[str, int]:
        # argv built here: this interpreter, -m module, host/port and config; no shell
        proc = subprocess.Popen(  # noqa: S603
            self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env(), close_fds=True
        )
        self._proc = proc
        lines: queue.Queue[bytes] = queue.Queue()

        def read_first_line() -> None:
            if proc.stdout is None:  # Popen(stdout=PIPE) always sets it
                raise RuntimeError("the simulator process has no stdout pipe")
            lines.put(proc.stdout.readline())

        threading.Thread(target=read_first_line, name="ragguard-simulator-port", daemon=True).start()
        try:
            line = lines.get(timeout=timeout)
            port = int(line.decode("ascii").strip())
        except (queue.Empty, ValueError, UnicodeDecodeError) as exc:
            self.stop()
            raise RuntimeError(f"the simulator process did not report its port (argv: {self._argv})") from exc
        return self._host, port

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()  # the child exits cleanly when its stdin closes
        try:
            proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


class Served(Generic[AppT]):
    """A running server: where it listens and, for the simulators, their stats.

    Attributes:
        app: the app object given to :func:`serve` (in process mode the child runs its own copy).
        host: the loopback address bound.
        port: the port bound.
        mode: ``"thread"`` or ``"process"``.
        url: ``http://HOST:PORT``.
        base_url: ``url + "/v1"``, what an OpenAI client's ``base_url`` wants.
    """

    def __init__(self, app: AppT, host: str, port: int, mode: ServeMode) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.mode: ServeMode = mode
        self.url = _url(host, port)
        self.base_url = self.url + "/v1"

    def __repr__(self) -> str:
        return f"Served(url={self.url!r}, mode={self.mode!r})"

    def _open(self, method: str, path: str) -> bytes:
        # self.url is the http://127.0.0.1 address of the server this object started
        request = urllib.request.Request(  # noqa: S310
            self.url + path, method=method, data=b"" if method == "POST" else None
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        with opener.open(request, timeout=30.0) as response:
            body: bytes = response.read()
            return body

    def get_json(self, path: str) -> Any:
        """``GET`` ``path`` on the server and decode its JSON body."""
        return json.loads(self._open("GET", path))

    def stats(self) -> Any:
        """The simulator's stats: from the app in thread mode, from ``GET /_sim/stats`` in process mode."""
        if self.mode == "thread" and callable(getattr(self.app, "stats", None)):
            return getattr(self.app, "stats")()  # noqa: B009 (duck-typed app)
        payload = self._open("GET", "/_sim/stats")
        parse: Callable[[bytes], Any] | None = getattr(self.app, "parse_stats", None)
        return parse(payload) if parse is not None else json.loads(payload)

    def reset(self) -> None:
        """Reset the simulator's buckets, stats and seeds (``POST /_sim/reset`` in process mode)."""
        if self.mode == "thread" and callable(getattr(self.app, "reset", None)):
            getattr(self.app, "reset")()  # noqa: B009
            return
        self._open("POST", "/_sim/reset")


class _Serving(Generic[AppT]):
    """Start/stop of one server, shared by :func:`serve` and :func:`aserve`."""

    def __init__(
        self,
        app: AppT,
        host: str,
        port: int,
        mode: ServeMode,
        startup_timeout: float,
        shutdown_timeout: float,
    ) -> None:
        _check_loopback(host)
        if mode not in ("thread", "process"):
            raise ValueError(f"mode must be 'thread' or 'process', not {mode!r}")
        self._app = app
        self._mode: ServeMode = mode
        self._startup_timeout = startup_timeout
        self._runner: _Runner
        if mode == "thread":
            self._runner = _ThreadRunner(app, host, port, shutdown_timeout)  # type: ignore[arg-type]
        else:
            if not isinstance(app, ProcessServable):
                raise TypeError(
                    f"{type(app).__name__} cannot be served in a process: it has no subprocess_argv()/parse_stats()"
                )
            self._runner = _ProcessRunner(app, host, port)

    def start(self) -> Served[AppT]:
        host, port = self._runner.start(self._startup_timeout)
        return Served(self._app, host, port, self._mode)

    def stop(self) -> None:
        self._runner.stop()


@contextlib.contextmanager
def serve(
    app: AppT,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    mode: ServeMode = "thread",
    startup_timeout: float = 30.0,
    shutdown_timeout: float = 2.0,
) -> Iterator[Served[AppT]]:
    """Serve ``app`` with uvicorn on ``host:port`` (port 0: a free one) until the block ends.

    Args:
        app: an ASGI app; in ``"process"`` mode it must implement :class:`ProcessServable`.
        host: a loopback address (anything else raises ``ValueError``).
        port: the port, ``0`` for a free one.
        mode: ``"thread"`` (uvicorn in a daemon thread with its own event loop) or ``"process"`` (a child
            process, stats over HTTP).
        startup_timeout: seconds to wait for the server to accept connections (``RuntimeError`` after).
        shutdown_timeout: seconds in-flight requests get to finish when the block ends (thread mode).

    Yields:
        a :class:`Served` with ``url``/``base_url``, ``stats()`` and ``reset()``.
    """
    serving = _Serving(app, host, port, mode, startup_timeout, shutdown_timeout)
    served = serving.start()
    try:
        yield served
    finally:
        serving.stop()


@contextlib.asynccontextmanager
async def aserve(
    app: AppT,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    mode: ServeMode = "thread",
    startup_timeout: float = 30.0,
    shutdown_timeout: float = 2.0,
) -> AsyncIterator[Served[AppT]]:
    """:func:`serve` as an async context manager, for asyncio and trio alike (start and stop run in a worker
    thread, so the caller's event loop never blocks). Same arguments as :func:`serve`."""
    serving = _Serving(app, host, port, mode, startup_timeout, shutdown_timeout)
    # Shielded both ways: a cancellation during start must not leak a running server (it is delivered at the
    # block's next checkpoint instead), and the server must stop even when the block was cancelled.
    with anyio.CancelScope(shield=True):
        served = await anyio.to_thread.run_sync(serving.start)
    try:
        yield served
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(serving.stop)


def run_foreground(app: ASGIApp, *, host: str, port: int, managed: bool) -> None:
    """Serve ``app`` in this process until interrupted (the simulators' ``python -m`` entry points).

    With ``managed`` (how :func:`serve` starts a child): print the bound port on stdout once accepting, and
    exit when stdin reaches end of file. Otherwise print the URL on stderr.
    """
    _check_loopback(host)
    sock = _bind(host, port)
    bound = int(sock.getsockname()[1])
    server = uvicorn.Server(_uvicorn_config(app, shutdown_timeout=2.0, configure_logging=True))

    def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.005)
        if managed:
            sys.stdout.write(f"{bound}\n")
            sys.stdout.flush()
            sys.stdin.buffer.read()  # returns at end of file: the parent is done (or gone)
            server.should_exit = True
        else:
            sys.stderr.write(f"serving on {_url(host, bound)} (OpenAI base_url {_url(host, bound)}/v1)\n")
            sys.stderr.flush()

    threading.Thread(target=announce, name="ragguard-simulator-announce", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


_ConfigT = TypeVar("_ConfigT", bound="BaseModel")


def config_from_flags(config_cls: type[_ConfigT], args: Any, fields: Sequence[str]) -> _ConfigT:
    """A simulator's config from its command-line flags: ``--config-json``, else the ``--flaky`` preset, else the
    defaults, with every flag in ``fields`` that was given overriding the base (revalidated, so a bad value is a
    :class:`pydantic.ValidationError` naming the field)."""
    if args.config_json:
        base = config_cls.model_validate_json(args.config_json)
    elif args.flaky:
        base = config_cls.flaky()  # type: ignore[attr-defined]
    else:
        base = config_cls()
    overrides = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    if not overrides:
        return base
    return config_cls.model_validate({**base.model_dump(), **overrides})


def simulator_main(parser: Any, make_app: Callable[[Any], Any], argv: Sequence[str] | None) -> int:
    """The ``python -m ragguard.testing.<simulator>`` entry point: parse ``argv``, build the app with
    ``make_app(args)`` and serve it in the foreground until interrupted; a bad config or a non-loopback host is a
    usage error."""
    args = parser.parse_args(argv)
    try:
        run_foreground(make_app(args), host=args.host, port=args.port, managed=args.managed)
    except ValueError as exc:  # invalid config (pydantic's ValidationError is one) or a non-loopback host
        parser.error(str(exc))
    return 0
