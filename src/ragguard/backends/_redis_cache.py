"""The Redis cache store: opaque ``bytes`` values with TTLs, shared by every process that uses one Redis.

:class:`RedisCacheStore` is the Redis counterpart of the in-memory cache store: ``get``/``set``/``delete`` are
one round trip each (``GET``, ``SET … PX``, ``UNLINK``); ``delete_prefix`` walks the keyspace with ``SCAN MATCH``
(every primary of a Redis Cluster) and removes what it finds with ``UNLINK`` in batches.

It stores what it is given and nothing else: the cache guard serialises values (JSON, or msgpack) before they get
here and parses them after; this module never unpickles, evaluates or imports anything it reads from Redis.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .redis import RedisBackend

__all__ = ["RedisCacheStore"]

#: bytes under another name, for annotations
_Bytes = bytes

#: keys per ``SCAN`` step (a hint to Redis) and per ``UNLINK`` batch
_SCAN_COUNT = 500
_UNLINK_BATCH = 500

#: characters Redis glob patterns (``SCAN MATCH``) treat specially
_GLOB_SPECIAL = re.compile(r"([\\*?\[\]^-])")


def glob_escape(text: str) -> str:
    """``text`` as a Redis glob pattern that matches exactly ``text`` (``*``, ``?``, ``[``, ``]``, ``\\``, ``^``
    and ``-`` backslash-escaped)."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


class RedisCacheStore:
    """An asynchronous cache store of ``bytes`` values under ``str`` keys, kept in Redis.

    The store behind ``Cache(store=backend.cache_store())`` when several processes or machines should share one
    cache. It satisfies :class:`ragguard.guards.cache.AsyncCacheStore`.

    - Keys: the cache gives namespaced, tenant-scoped keys (``"{namespace}:{scope}:{sha256}"``); the store puts
      ``"{backend namespace}:cache:"`` in front, so cache entries never collide with the rate-limiter or breaker
      keys of the same backend. Keys carry no hash tag: entries spread over every slot of a Redis Cluster.
    - Values: stored as given (``SET``), never interpreted. A value longer than ``max_value_bytes`` is not stored
      and any older value under its key is removed (a read never returns a stale value); ``set`` returns
      ``False``.
    - TTL: ``ttl`` seconds, sent as ``PX`` milliseconds (rounded up); Redis expires the entry on its own clock.
      ``None`` means no expiry; ``ttl <= 0`` stores nothing (and removes an older value).
    - Bounds and eviction: Redis applies its own ``maxmemory`` and ``maxmemory-policy`` (e.g. ``allkeys-lru``
      for a cache-only Redis, ``volatile-lru`` when it also holds limiter state: cache entries with a TTL go
      first). Those evictions happen inside Redis and are not counted here: :attr:`evictions` is always 0.
    - Errors: every operation runs through :meth:`RedisBackend.execute`, within the backend's ``timeout``, and
      raises :class:`~ragguard.BackendUnavailable` when Redis is down or slow. The cache guard turns that into
      a miss (``get``) or a skipped fill (``set``), whatever ``on_unavailable`` says: a cache is an
      optimisation and never fails a call. A key holding a non-string value (planted, or written by another
      program) reads as a miss and is removed.

    Counters (per process, since creation or :meth:`clear`): ``hits`` and ``misses`` of :meth:`get`;
    ``evictions`` (always 0, see above).

    Args:
        backend: the :class:`~ragguard.RedisBackend` whose connection pool, timeout and namespace it uses.
        max_value_bytes: the largest value stored, in bytes (``>= 1``; default 16 MiB).

    Raises:
        ValueError: ``max_value_bytes`` is below 1.
    """

    __slots__ = ("_prefix", "backend", "evictions", "hits", "max_value_bytes", "misses")

    def __init__(self, backend: RedisBackend, *, max_value_bytes: int = 16 * 2**20) -> None:
        if max_value_bytes < 1:
            raise ValueError("max_value_bytes must be >= 1")
        self.backend = backend
        self.max_value_bytes = max_value_bytes
        self._prefix = f"{backend.options.namespace}:cache:"
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __repr__(self) -> str:
        return f"RedisCacheStore(prefix={self._prefix!r}, max_value_bytes={self.max_value_bytes})"

    @property
    def prefix(self) -> str:
        """What the store puts in front of every key (``"{backend namespace}:cache:"``)."""
        return self._prefix

    def redis_key(self, key: str) -> str:
        """The Redis key that holds the cache entry ``key``."""
        return self._prefix + key

    async def get(self, key: str) -> _Bytes | None:
        """The value under ``key``, or ``None`` (missing, expired, or not a string value).

        Raises:
            BackendUnavailable: Redis did not answer within the backend's timeout.
        """
        import redis.exceptions

        name = self._prefix + key

        async def read(client: Any) -> _Bytes | None:
            try:
                value = await client.get(name)
            except redis.exceptions.ResponseError as exc:
                if not str(exc).startswith("WRONGTYPE"):
                    raise
                await client.unlink(name)  # not something this store wrote: drop it
                return None
            return None if value is None else bytes(value)

        found = await self.backend.execute(read)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    async def set(self, key: str, value: _Bytes, ttl: float | None) -> bool:
        """Store ``value`` under ``key`` for ``ttl`` seconds (``None``: no expiry).

        Returns:
            ``False`` when it was not stored: longer than ``max_value_bytes``, or ``ttl <= 0`` (any older value
            under ``key`` is removed then).

        Raises:
            BackendUnavailable: Redis did not answer within the backend's timeout.
        """
        name = self._prefix + key
        if len(value) > self.max_value_bytes or (ttl is not None and ttl <= 0):
            await self.backend.execute(lambda client: client.unlink(name))
            return False
        px = None if ttl is None else max(1, math.ceil(ttl * 1000))
        return bool(await self.backend.execute(lambda client: client.set(name, value, px=px)))

    async def delete(self, key: str) -> bool:
        """Remove ``key``; whether it was there.

        Raises:
            BackendUnavailable: Redis did not answer within the backend's timeout.
        """
        name = self._prefix + key
        return bool(await self.backend.execute(lambda client: client.unlink(name)))

    async def delete_prefix(self, prefix: str) -> int:
        """Remove every entry whose key starts with ``prefix``; how many were removed.

        Walks the keyspace with ``SCAN MATCH`` (``prefix`` glob-escaped, so ``*``, ``?`` or ``[`` in it match
        only themselves; on a Redis Cluster, every primary node) and removes the keys found with ``UNLINK``, in
        batches. O(keys in Redis), one round trip per step; each step has the backend's timeout. Not atomic:
        an entry written while it runs may survive.

        Raises:
            BackendUnavailable: Redis did not answer within the backend's timeout (some keys may be removed).
        """
        pattern = glob_escape(self._prefix + prefix) + "*"
        client = self.backend.client()
        if not hasattr(client, "get_primaries"):
            return await self._delete_matching(pattern, None)
        # redis.asyncio.cluster.RedisCluster: keys spread over every primary; SCAN each one (its node table is
        # empty until the client has initialised)
        await self.backend.execute(lambda c: c.initialize())
        removed = 0
        for node in client.get_primaries():
            removed += await self._delete_matching(pattern, node)
        return removed

    async def _delete_matching(self, pattern: str, node: Any) -> int:
        """SCAN one server (``node`` of a cluster, or the only one) for ``pattern`` and UNLINK what it finds."""
        execute = self.backend.execute
        removed = 0
        cursor = 0
        while True:
            found = await execute(_scan(cursor, pattern, node))
            if node is None:
                cursor, keys = found
            else:  # the cluster client answers ({node name: cursor}, keys)
                cursors, keys = found
                cursor = next(iter(cursors.values()), 0)
            for start in range(0, len(keys), _UNLINK_BATCH):
                removed += int(await execute(_unlink(keys[start : start + _UNLINK_BATCH])))
            if not cursor:
                return removed

    async def clear(self) -> None:
        """Remove every entry of this store (its whole prefix) and reset the counters.

        Raises:
            BackendUnavailable: Redis did not answer within the backend's timeout.
        """
        await self.delete_prefix("")
        self.hits = self.misses = self.evictions = 0


def _scan(cursor: int, pattern: str, node: Any) -> Callable[[Any], Awaitable[Any]]:
    """One ``SCAN`` step, for :meth:`RedisBackend.execute`."""
    if node is None:
        return lambda client: client.scan(cursor, match=pattern, count=_SCAN_COUNT)
    return lambda client: client.scan(cursor, match=pattern, count=_SCAN_COUNT, target_nodes=node)


def _unlink(keys: list[Any]) -> Callable[[Any], Awaitable[Any]]:
    """One ``UNLINK`` of ``keys``, for :meth:`RedisBackend.execute`."""
    return lambda client: client.unlink(*keys)
