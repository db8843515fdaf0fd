"""Cache stores: the protocols a :class:`~ragguard.guards.cache.Cache` accepts (:class:`CacheStore`, synchronous
and in process; :class:`AsyncCacheStore`, asynchronous, e.g. over the network) and the in-memory store (bytes values,
LRU eviction, TTL expiry, bounded by entries and bytes)."""

from __future__ import annotations

import inspect
import math
import threading
from collections import OrderedDict
from typing import Any, Protocol, runtime_checkable

import pydantic

from .. import telemetry
from .._clock import SYSTEM_CLOCK, Clock
from ..config import CachePolicy

__all__ = ["AsyncCacheStore", "CacheStore", "MemoryCacheStore", "is_async_store"]

#: ``bytes`` under another name, for annotations inside a class that has a ``bytes`` property
_Bytes = bytes

#: the bounds of :class:`MemoryCacheStore`, checked by :class:`~ragguard.CachePolicy`'s rules (one source of truth)
_BOUNDS = pydantic.create_model(
    "MemoryCacheStore",
    max_entries=(int, CachePolicy.model_fields["max_entries"]),
    max_bytes=(int, CachePolicy.model_fields["max_bytes"]),
)


@runtime_checkable
class CacheStore(Protocol):
    """What :class:`~ragguard.guards.cache.Cache` needs of a store: opaque ``bytes`` values under ``str`` keys.

    Methods are synchronous and must be quick (no network I/O): the guard calls them on the event loop.
    """

    def get(self, key: str) -> bytes | None:
        """The live value under ``key``, or ``None`` (missing or expired)."""
        ...

    def set(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Store ``value`` for ``ttl`` seconds (``None``: no expiry); ``False`` when it was not stored."""
        ...

    def delete(self, key: str) -> bool:
        """Remove ``key``; whether it was there."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key starting with ``prefix``; how many were removed."""
        ...

    def clear(self) -> None:
        """Remove everything."""
        ...


@runtime_checkable
class AsyncCacheStore(Protocol):
    """An asynchronous cache store, for stores that do I/O (e.g. the Redis store ``RedisBackend.cache_store()``
    makes): the methods of :class:`CacheStore` as coroutines.

    A :class:`~ragguard.guards.cache.Cache` tells the two kinds apart once, at construction, by whether ``get`` is
    a coroutine function (:func:`is_async_store`); ``isinstance`` cannot (both protocols name the same methods).
    Methods may raise :class:`~ragguard.BackendUnavailable` when the store cannot be reached: the cache treats
    it as a miss (``get``) or a skipped fill (``set``), never as a failed call.
    """

    async def get(self, key: str) -> bytes | None:
        """The live value under ``key``, or ``None`` (missing or expired)."""
        ...

    async def set(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Store ``value`` for ``ttl`` seconds (``None``: no expiry); ``False`` when it was not stored."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove ``key``; whether it was there."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Remove every key starting with ``prefix``; how many were removed."""
        ...

    async def clear(self) -> None:
        """Remove everything."""
        ...


def is_async_store(store: Any) -> bool:
    """Whether ``store`` is an :class:`AsyncCacheStore` (its ``get`` is a coroutine function), not a
    :class:`CacheStore`."""
    return inspect.iscoroutinefunction(getattr(store, "get", None))


class MemoryCacheStore:
    """A bounded, thread-safe LRU + TTL store of ``bytes`` values, in process memory.

    - Bounds: at most ``max_entries`` entries and ``max_bytes`` bytes, counted on the stored (serialised)
      values only, not on keys or bookkeeping. Inserting past a bound evicts least-recently-used entries.
    - A value longer than ``max_bytes`` is never stored (it would evict everything and still not fit); any
      older value under the same key is removed, so a read never returns a stale value. ``set`` returns ``False``.
    - TTL: an entry expires ``ttl`` seconds (on ``clock``) after it was set; ``None`` means it never expires.
      Expiry is lazy: an expired entry is dropped when read, and when eviction reaches it on insert.
    - ``get`` and ``set`` are O(1) (an :class:`~collections.OrderedDict` in recency order, least recent first);
      ``delete_prefix`` is O(n). Every method holds a :class:`threading.Lock` only for the dictionary work.

    Counters (since creation or :meth:`clear`): ``hits``, ``misses``, ``evictions`` (LRU, to respect a bound)
    and ``expirations`` (TTL).

    Args:
        max_entries: most entries held (an integer ``>= 1``, as :attr:`CachePolicy.max_entries
            <ragguard.CachePolicy>`).
        max_bytes: most bytes of values held (an integer ``>= 1``, as :attr:`CachePolicy.max_bytes
            <ragguard.CachePolicy>`).
        clock: the clock TTLs are measured on.

    Raises:
        pydantic.ValidationError: a bound that is not an integer ``>= 1`` (NaN included), naming it.
    """

    __slots__ = (
        "_bytes",
        "_data",
        "_lock",
        "clock",
        "evictions",
        "expirations",
        "hits",
        "max_bytes",
        "max_entries",
        "misses",
    )

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 64 * 2**20, *, clock: Clock = SYSTEM_CLOCK) -> None:
        bounds = _BOUNDS(max_entries=max_entries, max_bytes=max_bytes).model_dump()
        self.max_entries: int = bounds["max_entries"]
        self.max_bytes: int = bounds["max_bytes"]
        self.clock = clock
        # key -> (value, absolute expiry time on ``clock``; math.inf when none); least recently used first
        self._data: OrderedDict[str, tuple[_Bytes, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def bytes(self) -> int:
        """Bytes of values held (expired entries not yet dropped included)."""
        return self._bytes

    def get(self, key: str) -> _Bytes | None:
        """The live value under ``key`` (now the most recently used), or ``None``."""
        now = self.clock.now()
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                self.misses += 1
                return None
            if entry[1] <= now:
                del self._data[key]
                self._bytes -= len(entry[0])
                self.expirations += 1
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return entry[0]

    def set(self, key: str, value: _Bytes, ttl: float | None) -> bool:
        """Store ``value`` under ``key`` for ``ttl`` seconds (``None``: no expiry), evicting LRU entries to fit.

        Returns:
            ``False`` when ``value`` alone exceeds ``max_bytes`` (not stored; an older value is removed).
        """
        size = len(value)
        expires = math.inf if ttl is None else self.clock.now() + ttl
        with self._lock:
            data = self._data
            old = data.pop(key, None)
            if old is not None:
                self._bytes -= len(old[0])
            if size > self.max_bytes:
                return False
            now = self.clock.now()
            while data and (len(data) >= self.max_entries or self._bytes + size > self.max_bytes):
                _, (dropped, dropped_expiry) = data.popitem(last=False)
                self._bytes -= len(dropped)
                if dropped_expiry <= now:
                    self.expirations += 1
                else:
                    self.evictions += 1
                    telemetry.cache_accessed("store", "evicted")
            data[key] = (value, expires)
            self._bytes += size
            return True

    def delete(self, key: str) -> bool:
        """Remove ``key``; whether it was there."""
        with self._lock:
            entry = self._data.pop(key, None)
            if entry is None:
                return False
            self._bytes -= len(entry[0])
            return True

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key that starts with ``prefix`` (e.g. a namespace); how many were removed. O(n)."""
        with self._lock:
            doomed = [key for key in self._data if key.startswith(prefix)]
            for key in doomed:
                self._bytes -= len(self._data.pop(key)[0])
            return len(doomed)

    def clear(self) -> None:
        """Remove every entry and reset the counters."""
        with self._lock:
            self._data.clear()
            self._bytes = 0
            self.hits = self.misses = self.evictions = self.expirations = 0

    def __repr__(self) -> str:
        return f"MemoryCacheStore(entries={len(self._data)}/{self.max_entries}, bytes={self._bytes}/{self.max_bytes})"
