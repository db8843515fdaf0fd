"""``ragguard.RedisBackend``: the state that several processes or machines must share, kept in Redis.

One backend holds one connection pool per event loop it is used on (normally exactly one: the app's loop, or the
sync bridge's loop for sync callers), reused by every guard. Every hot-path operation is one round trip: a Lua
script run by ``EVALSHA`` (redis-py's ``AsyncScript`` loads it once and reloads it on ``NOSCRIPT``), keys passed
as ``KEYS``, never interpolated into the script. Keys carry a Redis Cluster hash tag, ``{…}``, so every key of
one bucket or breaker lands in one slot and a script touching them runs on one node.

When Redis is unreachable or slower than ``timeout`` seconds, an operation raises
:class:`~ragguard.BackendUnavailable` (chaining the cause) fast; the guards then apply ``on_unavailable``:
``fail_open`` falls back to local state holding this process's fair share, ``fail_closed`` lets the error reach
the caller. Both recover by themselves: every call tries Redis again.

redis-py's asyncio client runs on asyncio only (not trio); sync callers reach it through ragguard's sync bridge,
which runs asyncio.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict, Field

from ..errors import BackendUnavailable
from .memory import MemoryBackend

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from ._redis_breaker import RedisBreakerStore
    from ._redis_bucket import RedisBucketStore
    from ._redis_budget import RedisBudgetStore
    from ._redis_cache import RedisCacheStore

__all__ = ["RedisBackend", "RedisBackendOptions"]

T = TypeVar("T")

OnUnavailable = Literal["fail_open", "fail_closed"]


class RedisBackendOptions(BaseModel):
    """Validated settings of a :class:`RedisBackend`.

    Attributes:
        namespace: the first part of every key (non-empty; no ``{``/``}``, which delimit hash tags, and no ``:``,
            the separator, so one app's namespace never reaches into another's keys).
        on_unavailable: ``fail_open`` (fall back to local state holding this process's share of each limit) or
            ``fail_closed`` (raise :class:`~ragguard.BackendUnavailable`) when Redis cannot answer in time.
        timeout: seconds one Redis operation may take before it counts as unavailable (``> 0``).
        expected_instances: how many processes share the limits; a ``fail_open`` fallback limiter allows this
            process ``1/expected_instances`` of each rate (``>= 1``).
        max_connections: connections in the pool of each event loop (``>= 1``).
        cluster: treat the URL as a Redis Cluster node (``redis.asyncio.cluster.RedisCluster``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # no ":" (the separator: backend "app" would otherwise reach backend "app:cache"'s keys) and no hash-tag braces
    namespace: str = Field(default="ragguard", min_length=1, pattern=r"^[^{}:]+$")
    on_unavailable: OnUnavailable = "fail_open"
    timeout: float = Field(default=0.25, gt=0, le=60)
    expected_instances: int = Field(default=1, ge=1, le=100_000)
    max_connections: int = Field(default=64, ge=1, le=100_000)
    cluster: bool = False


_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError)


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions

    return (
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        redis.exceptions.BusyLoadingError,
        redis.exceptions.ClusterDownError,
        redis.exceptions.TryAgainError,
        # a full Redis (maxmemory + noeviction), a replica that cannot take writes, a primary gone: the shared
        # state cannot be kept, which is "unavailable" (fail_open / fail_closed), not a provider failure to retry
        redis.exceptions.OutOfMemoryError,
        redis.exceptions.ReadOnlyError,
        redis.exceptions.MasterDownError,
        *_UNAVAILABLE_ERRORS,
    )


def _response_error() -> type[Exception]:
    import redis.exceptions

    return redis.exceptions.ResponseError


#: replies saying Redis cannot keep state now (full under ``noeviction``, a read-only replica, its primary gone);
#: from inside a Lua script they arrive as a plain ``ResponseError`` ("... -OOM command not allowed ..."), not
#: as redis-py's dedicated exception types
_STATE_REFUSALS = ("OOM command not allowed", "READONLY", "MASTERDOWN")


def unavailable_reply(exc: BaseException) -> bool:
    """Whether an error reply means "Redis cannot keep state now" (to be handled as unavailable)."""
    text = str(exc)
    return any(marker in text for marker in _STATE_REFUSALS)


class RedisBackend:
    """Shared state in Redis, for apps that run as several processes or machines.

    Pass it wherever a backend is accepted: ``ragguard.guard(client, policy, backend=RedisBackend(url))``. The
    guards whose state must be shared across instances (rate limits, circuit breakers, retry budgets, caches) then
    keep it in Redis; per-process ones (bulkheads, single-flight, micro-batching) stay local.

    Args:
        url: ``redis://[[user]:password@]host:port/db`` or ``rediss://…`` (TLS), ACL user and password taken from
            it; or an existing ``redis.asyncio.Redis`` / ``RedisCluster`` client (then it is used as is, on its
            own event loop, and not closed by :meth:`aclose`).
        namespace, on_unavailable, timeout, expected_instances, max_connections, cluster: see
            :class:`RedisBackendOptions`.

    Raises:
        pydantic.ValidationError: an invalid option, naming the field.
        ImportError: redis-py is not installed (``pip install 'ragguard[redis]'``).
    """

    def __init__(
        self,
        url: str | Redis | RedisCluster = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "ragguard",
        on_unavailable: OnUnavailable = "fail_open",
        timeout: float = 0.25,
        expected_instances: int = 1,
        max_connections: int = 64,
        cluster: bool = False,
    ) -> None:
        import redis.asyncio  # noqa: F401 - fail at construction when redis-py is missing

        self.options = RedisBackendOptions(
            namespace=namespace,
            on_unavailable=on_unavailable,
            timeout=timeout,
            expected_instances=expected_instances,
            max_connections=max_connections,
            cluster=cluster,
        )
        self._url = url if isinstance(url, str) else None
        self._given = None if isinstance(url, str) else url
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._scripts: dict[tuple[int, str], Any] = {}
        self._lock = threading.Lock()
        self._local = MemoryBackend()
        self._errors = _redis_errors()
        self._response_error = _response_error()
        #: the last Redis failure seen (``None`` once an operation succeeded again), for health reports
        self.last_error: BaseException | None = None

    def __repr__(self) -> str:
        where = "client" if self._url is None else _redact(self._url)
        return f"RedisBackend({where}, namespace={self.options.namespace!r}, {self.options.on_unavailable})"

    # --- connection -------------------------------------------------------------------------------------

    @property
    def namespace(self) -> str:
        return self.options.namespace

    def client(self) -> Any:
        """The redis-py asyncio client for the running event loop (made on first use; one pool per loop)."""
        if self._given is not None:
            return self._given
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            with self._lock:
                client = self._clients.get(loop)
                if client is None:
                    client = self._connect()
                    self._clients[loop] = client
        return client

    def _connect(self) -> Any:
        options = self.options
        url = self._url or ""
        if options.cluster:
            from redis.asyncio.cluster import RedisCluster

            return RedisCluster.from_url(
                url,
                socket_timeout=options.timeout,
                socket_connect_timeout=options.timeout,
                max_connections=options.max_connections,
            )
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        # a blocking pool: a burst of callers beyond max_connections waits (up to the timeout) for a connection
        # instead of failing at once with MaxConnectionsError. One immediate retry on a connection error, on a
        # fresh connection: after Redis restarted, every idle pooled connection is dead and would otherwise fail
        # one operation each (seconds of spurious failures); never on a timeout, where the command may have run.
        pool = BlockingConnectionPool.from_url(
            url,
            socket_timeout=options.timeout,
            socket_connect_timeout=options.timeout,
            max_connections=options.max_connections,
            timeout=options.timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        return Redis.from_pool(pool)

    def script(self, source: str) -> Any:
        """A redis-py ``AsyncScript`` for ``source`` on this loop's client: ``EVALSHA``, reloaded on ``NOSCRIPT``."""
        client = self.client()
        key = (id(client), source)
        found = self._scripts.get(key)
        if found is None:
            found = self._scripts[key] = client.register_script(source)
        return found

    async def execute(self, operation: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``operation(client)`` within ``timeout`` seconds.

        Raises:
            BackendUnavailable: Redis did not answer in time, or the connection failed (the cause chained).
        """
        try:
            with anyio.fail_after(self.options.timeout):
                result = await operation(self.client())
        except self._errors as exc:
            self.last_error = exc
            raise BackendUnavailable(f"redis unavailable: {type(exc).__name__}: {exc}") from exc
        except self._response_error as exc:
            if not unavailable_reply(exc):
                raise
            self.last_error = exc
            raise BackendUnavailable(f"redis cannot keep state: {type(exc).__name__}: {exc}") from exc
        self.last_error = None
        return result

    async def ping(self) -> bool:
        """Whether Redis answers ``PING`` within the timeout."""
        try:
            return bool(await self.execute(lambda client: client.ping()))
        except BackendUnavailable:
            return False

    async def aclose(self) -> None:
        """Close the connection pool of the running loop (a client passed in is left open)."""
        if self._given is not None:
            return
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._clients.pop(loop, None)
            self._scripts = {k: v for k, v in self._scripts.items() if k[0] != id(client)}
        if client is not None:
            await client.aclose()

    # --- keys -------------------------------------------------------------------------------------------

    def key(self, kind: str, name: str, *suffix: str) -> str:
        """A namespaced key whose hash tag is ``kind`` + a digest of ``name``: every key of one bucket or breaker
        (same ``kind`` and ``name``, any ``suffix``) maps to one Redis Cluster slot. ``name`` is hashed, so a
        name holding a credential fingerprint or a tenant id never appears in clear."""
        tag = hashlib.sha256(f"{kind}\x00{name}".encode()).hexdigest()[:24]
        tail = ":".join(suffix)
        return f"{self.options.namespace}:{{{kind}:{tag}}}" + (f":{tail}" if tail else "")

    # --- shared state (each store lives in its own module; made once per backend) -------------------------

    def bucket_store(self) -> RedisBucketStore:
        """The token-bucket store (requests and tokens per minute) shared through this Redis."""
        from ._redis_bucket import RedisBucketStore

        return self._local.get_or_create("redis:bucket_store", "", lambda: RedisBucketStore(self))

    def breaker_store(self) -> RedisBreakerStore:
        """The circuit-breaker state store shared through this Redis."""
        from ._redis_breaker import RedisBreakerStore

        return self._local.get_or_create("redis:breaker_store", "", lambda: RedisBreakerStore(self))

    def budget_store(self) -> RedisBudgetStore:
        """The retry-budget store (sliding windows of requests and retries) shared through this Redis."""
        from ._redis_budget import RedisBudgetStore

        return self._local.get_or_create("redis:budget_store", "", lambda: RedisBudgetStore(self))

    def cache_store(self, *, max_value_bytes: int = 16 * 2**20) -> RedisCacheStore:
        """The cache store (bytes values with TTLs) shared through this Redis; values above
        ``max_value_bytes`` are not stored."""
        from ._redis_cache import RedisCacheStore

        return self._local.get_or_create(
            "redis:cache_store", str(max_value_bytes), lambda: RedisCacheStore(self, max_value_bytes=max_value_bytes)
        )

    # --- local objects ----------------------------------------------------------------------------------

    def get_or_create(self, kind: str, key: str, factory: Callable[[], T]) -> T:
        """A per-process object (e.g. a bulkhead), as :meth:`MemoryBackend.get_or_create`."""
        return self._local.get_or_create(kind, key, factory)

    def items(self, kind: str) -> list[tuple[str, Any]]:
        """Every per-process ``(key, object)`` of one kind (for health reports)."""
        return self._local.items(kind)


def _redact(url: str) -> str:
    """``url`` without its password (for repr and logs)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
