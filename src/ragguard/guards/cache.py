"""A response cache that is safe to share: JSON values (never pickle), hashed, namespaced, tenant-scoped keys.

:class:`Cache` is the outermost stage of a pipeline (a hit costs no quota): it looks the call's key up, returns
the cached value on a hit, and on a miss runs the call and stores its result. Exceptions are never cached.

Keys (:func:`cache_key`) have the shape ``"{namespace}:{scope or '-'}:{sha256 hex}"`` (``%``, ``:`` and a lone
``-`` percent-escaped in namespace and scope, so no two tenants' prefixes collide), the digest taken over a
canonical JSON (sorted keys, no whitespace) of the namespace, scope, credential fingerprint and key parts, so
dict order never matters and two tenants, or two API keys, never read each other's entries. Secrets never
appear in keys: pass :func:`fingerprint` of a credential.

Values are stored as bytes made by a :class:`Serializer`, JSON by default. Pickle is never used: a pickle cache
shared between processes turns a writable cache into remote code execution (LangGraph CVE-2026-27794; cashews
defaults to pickle on Redis). To cache objects JSON cannot hold (an SDK's pydantic response), pass ``encode`` /
``decode`` hooks, e.g. ``encode=lambda r: r.model_dump(mode="json")`` and
``decode=CreateEmbeddingResponse.model_validate``.

Stores: entries live in a :class:`CacheStore` (synchronous, in process; :class:`MemoryCacheStore` by default) or
an :class:`AsyncCacheStore` (asynchronous, shared: ``RedisBackend(url).cache_store()``). With an asynchronous
store a lookup and a fill are one round trip each, and the store being unreachable
(:class:`~ragguard.BackendUnavailable`) is a miss on lookup and a skipped fill, logged at debug and counted in
:attr:`Cache.unavailable`, whatever the backend's ``on_unavailable`` says: a cache is an optimisation, so it never
fails a call. Invalidate such a cache with ``await cache.ainvalidate()`` (:meth:`Cache.invalidate` is synchronous).
"""

from __future__ import annotations

import array
import hashlib
import importlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, Protocol, TypeVar, cast, runtime_checkable

from pydantic import BaseModel

from .. import telemetry
from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from ..config import CachePolicy
from ..errors import BackendUnavailable
from ._cache_store import AsyncCacheStore, CacheStore, MemoryCacheStore, is_async_store
from .coalesce import FOLLOWER_EXTRA
from .pipeline import GuardBase

__all__ = [
    "AsyncCacheStore",
    "Cache",
    "CachePolicy",
    "CacheStore",
    "JsonSerializer",
    "MemoryCacheStore",
    "MsgpackSerializer",
    "Serializer",
    "cache_key",
    "cached",
    "fingerprint",
    "retrieval_cache_key",
    "vector_digest",
]

logger = logging.getLogger("ragguard.cache")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: domain separation for credential fingerprints, so they match no other sha256 of the same secret
_FINGERPRINT_PREFIX = b"ragguard.credential.v1\x00"


@runtime_checkable
class Serializer(Protocol):
    """Turns a cacheable value into bytes and back. Must not execute code on ``loads`` (so: never pickle)."""

    def dumps(self, obj: Any) -> bytes:
        """``obj`` as bytes. Raises ``TypeError``/``ValueError`` when it cannot be represented."""
        ...

    def loads(self, data: bytes) -> Any:
        """The value ``data`` holds. Raises (any ``Exception``) when ``data`` is corrupt."""
        ...


def _canonical(obj: Any, default: Callable[[Any], Any] | None = None) -> str:
    """Canonical JSON: sorted keys, no whitespace, UTF-8 kept, NaN/Infinity refused (they are not JSON)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=default)


def _key_part(obj: Any) -> Any:
    """How a key part JSON cannot hold is keyed: a pydantic model by its JSON dump (e.g. an SDK message passed
    back into a conversation); anything else is refused."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json", exclude_unset=True)
    raise TypeError(f"{type(obj).__name__} cannot be part of a cache key")


class JsonSerializer:
    """Compact, canonical UTF-8 JSON (stdlib :mod:`json`). Tuples come back as lists; NaN is refused."""

    __slots__ = ()

    def dumps(self, obj: Any) -> bytes:
        return _canonical(obj).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


class MsgpackSerializer:
    """MessagePack (the optional ``msgpack`` package; not a ragguard dependency): smaller and faster than JSON.

    Raises:
        ImportError: (from the constructor) ``msgpack`` is not installed.
    """

    __slots__ = ("_msgpack",)

    def __init__(self) -> None:
        self._msgpack: Any = importlib.import_module("msgpack")

    def dumps(self, obj: Any) -> bytes:
        return cast(bytes, self._msgpack.packb(obj, use_bin_type=True))

    def loads(self, data: bytes) -> Any:
        return self._msgpack.unpackb(data, raw=False)


# --- keys ----------------------------------------------------------------------------------------------------


def fingerprint(secret: str) -> str:
    """A credential's fingerprint for cache keys: 16 hex digits of sha256 over a fixed prefix and the secret.

    Separates tenants that use different API keys without ever putting a secret in a key.
    """
    return hashlib.sha256(_FINGERPRINT_PREFIX + secret.encode()).hexdigest()[:16]


def _escape(part: str) -> str:
    # ":" separates the prefix's parts and "-" alone stands for "no scope": escape both (and the escape char)
    escaped = part.replace("%", "%25").replace(":", "%3A")
    return "%2D" if escaped == "-" else escaped


def _prefix(namespace: str, scope: str | None) -> str:
    """``"{namespace}:{scope or '-'}:"`` with ``%``, ``:`` and a lone ``-`` percent-escaped in each part, so no
    two (namespace, scope) pairs share a prefix (nor one prefix start another's)."""
    return f"{_escape(namespace)}:{'-' if scope is None else _escape(scope)}:"


def cache_key(namespace: str, scope: str | None, credential: str | None, *parts: Any) -> str:
    """A namespaced, hashed cache key: ``"{namespace}:{scope or '-'}:{sha256 hex}"``.

    The digest covers a canonical JSON (sorted keys, no whitespace) of ``[namespace, scope, credential, parts]``,
    so dict order is irrelevant and keys with a different scope or credential never collide (a scope of
    ``"-"`` and no scope differ too). JSON normalises some values: a tuple keys like a list, and a non-string
    dict key like its string form; a pydantic model keys like its JSON dump (fields it was given).

    Args:
        namespace: e.g. ``"ragguard"`` or ``"openai.embeddings"``.
        scope: the tenant id, or ``None``.
        credential: a :func:`fingerprint` of the credential (never the secret itself), or ``None``.
        *parts: JSON-serialisable parts (model, dimensions, input…).

    Raises:
        TypeError, ValueError: a part is not JSON-serialisable (or is NaN/infinite).
    """
    payload = _canonical([namespace, scope, credential, list(parts)], _key_part)
    return _prefix(namespace, scope) + hashlib.sha256(payload.encode()).hexdigest()


def vector_digest(vector: Sequence[float]) -> str:
    """sha256 (hex) of a vector's float64 values: the same numbers always give the same digest, whatever the
    sequence type, and a vector never appears in a key in full.

    Raises:
        TypeError: a component is not a number.
    """
    return hashlib.sha256(array.array("d", vector).tobytes()).hexdigest()


def retrieval_cache_key(
    namespace: str,
    scope: str | None,
    credential: str | None,
    *,
    index: str,
    vector: Sequence[float],
    top_k: int,
    vector_namespace: str | None = None,
    filter: Any = None,  # the vector stores' own name for it
    **options: Any,
) -> str:
    """The cache key of a vector query: index, vector namespace, a hash of the query vector, ``top_k``, the
    metadata filter (canonical JSON, so key order never matters) and any other option that shapes the result
    (e.g. ``include_metadata=True``), in a :func:`cache_key` of ``namespace``/``scope``/``credential``.

    Retrieval results change when the index is written to: give retrieval caches a short TTL, or
    :meth:`Cache.invalidate` them after upserts.

    Raises:
        TypeError, ValueError: the filter or an option is not JSON-serialisable, or the vector not numbers.
    """
    return cache_key(
        namespace,
        scope,
        credential,
        "retrieval",
        index,
        vector_namespace,
        vector_digest(vector),
        top_k,
        filter,
        options,
    )


# --- the guard -----------------------------------------------------------------------------------------------


class _Miss:
    __slots__ = ()


_MISS = _Miss()


def _default_key(ctx: CallContext) -> str | None:
    extras = ctx.extras
    return extras.get("cache_key") if extras else None


class Cache(GuardBase):
    """Serve repeated calls from a cache (stage ``cache``, outermost): lookup → hit, or call → fill.

    Per call, ``key(ctx)`` gives the key (default: ``ctx.extras["cache_key"]``); ``None`` bypasses the cache (no
    lookup, no fill). Keys are stored under ``"{namespace}:{scope or '-'}:"`` (added unless the key already
    starts with it, as :meth:`key_for` keys do), so every key is tenant-scoped. A hit sets
    ``ctx.extras["cache_hit"] = True`` (``False`` on a miss). Only successful results are stored, never
    exceptions; a value the serializer (or ``encode``) cannot handle is returned but not cached (logged at
    debug). An entry that no longer decodes is deleted and treated as a miss: the cache never raises to the
    caller because of its content.

    Args:
        enabled, ttl, max_entries, max_bytes, namespace, scope: see :class:`CachePolicy`
            (``max_entries``/``max_bytes`` size the default in-memory store only).
        store: where entries live (default: a :class:`MemoryCacheStore` sized by the policy): a
            :class:`CacheStore` or an :class:`AsyncCacheStore` (told apart once, here, by whether ``store.get`` is
            a coroutine function). An asynchronous store being unreachable makes lookups misses and fills no-ops
            (counted in :attr:`unavailable`); the call itself never fails because of it.
        serializer: bytes ↔ value (default :class:`JsonSerializer`; never pickle).
        key: ``key(ctx) -> str | None``, the call's key.
        encode: ``encode(result) -> JSON-able`` before serialising (e.g. ``lambda r: r.model_dump(mode="json")``).
        decode: ``decode(JSON-able) -> result`` after loading (e.g. ``Model.model_validate``).
        clock: the clock of the default store and of contexts :meth:`call` creates.

    Raises:
        pydantic.ValidationError: (from the constructor) an option is invalid, naming the field.
    """

    stage: ClassVar[str] = "cache"
    __slots__ = (
        "_astore",
        "_async",
        "_decode",
        "_encode",
        "_hits",
        "_key",
        "_misses",
        "_prefix",
        "_sstore",
        "_unavailable",
        "clock",
        "policy",
        "serializer",
        "store",
    )

    def __init__(
        self,
        *,
        enabled: bool = True,
        ttl: float | None = 3600.0,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 2**20,
        namespace: str = "ragguard",
        scope: str | None = None,
        store: CacheStore | AsyncCacheStore | None = None,
        serializer: Serializer | None = None,
        key: Callable[[CallContext], str | None] | None = None,
        encode: Callable[[Any], Any] | None = None,
        decode: Callable[[Any], Any] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        policy = CachePolicy(
            enabled=enabled,
            ttl=ttl,
            max_entries=max_entries,
            max_bytes=max_bytes,
            namespace=namespace,
            scope=scope,
        )
        self.policy = policy
        self.clock = clock
        #: where entries live (fixed at construction: whether it is asynchronous is decided here)
        self.store: CacheStore | AsyncCacheStore = (
            store if store is not None else MemoryCacheStore(policy.max_entries, policy.max_bytes, clock=clock)
        )
        self._async = is_async_store(self.store)
        # the same object, typed for each path (only the one ``_async`` selects is used)
        self._sstore = cast(CacheStore, self.store)
        self._astore = cast(AsyncCacheStore, self.store)
        self._unavailable = 0
        self.serializer: Serializer = serializer if serializer is not None else JsonSerializer()
        self._key = key if key is not None else _default_key
        self._encode = encode
        self._decode = decode
        self._prefix = _prefix(policy.namespace, policy.scope)
        self._hits = 0
        self._misses = 0

    @classmethod
    def from_policy(cls, section: CachePolicy, **extras: Any) -> Cache:
        """A cache configured by ``section``; ``extras`` are the non-policy options (``store``, ``key``…).

        Reads the section's store settings (``enabled``, ``ttl``, ``max_entries``, ``max_bytes``, ``namespace``,
        ``scope``); the layer switches (``embeddings``, ``responses``, ``semantic``) are for guarded clients."""
        fields = section.model_dump(include={"enabled", "ttl", "max_entries", "max_bytes", "namespace", "scope"})
        return cls(**fields, **extras)

    def __repr__(self) -> str:
        p = self.policy
        return f"Cache(namespace={p.namespace!r}, scope={p.scope!r}, ttl={p.ttl}, enabled={p.enabled})"

    # stats ---------------------------------------------------------------------------------------------------

    @property
    def hits(self) -> int:
        """Lookups that returned a cached value."""
        return self._hits

    @property
    def misses(self) -> int:
        """Lookups that found nothing usable (missing, expired or undecodable)."""
        return self._misses

    @property
    def unavailable(self) -> int:
        """Store operations that failed with :class:`~ragguard.BackendUnavailable` (an asynchronous store that
        could not be reached), each served as a miss or a skipped fill."""
        return self._unavailable

    @property
    def evictions(self) -> int:
        """Entries the store dropped to respect its bounds (0 when the store does not count them)."""
        return int(getattr(self.store, "evictions", 0))

    # keys ----------------------------------------------------------------------------------------------------

    def key_for(self, credential: str | None, *parts: Any) -> str:
        """:func:`cache_key` in this cache's namespace and scope. Raises ``TypeError``/``ValueError`` like it."""
        return cache_key(self.policy.namespace, self.policy.scope, credential, *parts)

    def _full(self, key: str) -> str:
        prefix = self._prefix
        return key if key.startswith(prefix) else prefix + key

    # direct access -------------------------------------------------------------------------------------------

    def _lookup(self, full: str, record: bool = True) -> Any:
        raw = self._sstore.get(full)
        if raw is None:
            self._misses += record
            if record:
                telemetry.cache_accessed(self.policy.namespace, "miss")
            return _MISS
        try:
            value = self.serializer.loads(raw)
            result = self._decode(value) if self._decode is not None else value
        except Exception:
            # a corrupt or outdated entry is a miss, and must not be served again
            logger.debug("ragguard cache: dropping undecodable entry %s", full, exc_info=True)
            self._sstore.delete(full)
            self._misses += record
            return _MISS
        self._hits += record
        if record:
            telemetry.cache_accessed(self.policy.namespace, "hit")
        return result

    def _store_unavailable(self, action: str, full: str) -> None:
        self._unavailable += 1
        logger.debug("ragguard cache: store unavailable on %s of %s; going uncached", action, full, exc_info=True)

    async def _alookup(self, full: str, record: bool = True) -> Any:
        """:meth:`_lookup` on an asynchronous store; an unreachable store is a miss."""
        store = self._astore
        try:
            raw = await store.get(full)
        except BackendUnavailable:
            self._store_unavailable("lookup", full)
            raw = None
        if raw is None:
            self._misses += record
            if record:
                telemetry.cache_accessed(self.policy.namespace, "miss")
            return _MISS
        try:
            value = self.serializer.loads(raw)
            result = self._decode(value) if self._decode is not None else value
        except Exception:
            logger.debug("ragguard cache: dropping undecodable entry %s", full, exc_info=True)
            try:
                await store.delete(full)
            except BackendUnavailable:
                self._store_unavailable("delete", full)
            self._misses += record
            return _MISS
        self._hits += record
        if record:
            telemetry.cache_accessed(self.policy.namespace, "hit")
        return result

    def _fill(self, full: str, value: Any, ttl: float | None) -> bool:
        try:
            data = self.serializer.dumps(self._encode(value) if self._encode is not None else value)
        except Exception:
            logger.debug("ragguard cache: value for %s is not serialisable; not cached", full, exc_info=True)
            return False
        return self._sstore.set(full, data, ttl)

    async def _afill(self, full: str, value: Any, ttl: float | None) -> bool:
        """:meth:`_fill` on an asynchronous store; an unreachable store stores nothing."""
        try:
            data = self.serializer.dumps(self._encode(value) if self._encode is not None else value)
        except Exception:
            logger.debug("ragguard cache: value for %s is not serialisable; not cached", full, exc_info=True)
            return False
        try:
            return await self._astore.set(full, data, ttl)
        except BackendUnavailable:
            self._store_unavailable("fill", full)
            return False

    async def get(self, key: str, default: Any = None, *, record: bool = True) -> Any:
        """The cached value under ``key`` (scoped like :meth:`run`'s keys), or ``default``.

        ``record=False`` leaves :attr:`hits`/:attr:`misses` alone (a peek whose outcome another lookup counts).
        """
        full = self._full(key)
        found = await self._alookup(full, record) if self._async else self._lookup(full, record)
        return default if isinstance(found, _Miss) else found

    async def set(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` under ``key`` for ``ttl`` seconds (``None``: the policy's ttl).

        Returns:
            whether it was stored (``False``: not serialisable, larger than the store allows, or an asynchronous
            store unreachable).
        """
        ttl = self.policy.ttl if ttl is None else ttl
        if self._async:
            return await self._afill(self._full(key), value, ttl)
        return self._fill(self._full(key), value, ttl)

    def invalidate(self, prefix: str = "") -> int:
        """Delete this cache's entries whose key starts with ``prefix`` (default: all of its namespace and scope).

        Synchronous, for a synchronous store (the default in-memory one); :meth:`ainvalidate` works with both.

        Returns:
            how many entries were deleted.

        Raises:
            TypeError: the store is asynchronous (use ``await cache.ainvalidate(prefix)``).
        """
        if self._async:
            raise TypeError("this cache's store is asynchronous: use `await cache.ainvalidate(prefix)`")
        return self._sstore.delete_prefix(self._full(prefix))

    async def ainvalidate(self, prefix: str = "") -> int:
        """:meth:`invalidate` for either kind of store: delete this cache's entries whose key starts with
        ``prefix`` (default: all of its namespace and scope; never another namespace's or scope's).

        Unlike lookups and fills, an invalidation the store cannot carry out is reported, not ignored: entries it
        should have removed may still be served.

        Returns:
            how many entries were deleted.

        Raises:
            BackendUnavailable: an asynchronous store could not be reached (some entries may be deleted).
        """
        full = self._full(prefix)
        if self._async:
            return await self._astore.delete_prefix(full)
        return self._sstore.delete_prefix(full)

    # the guard -----------------------------------------------------------------------------------------------

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Return the cached result of the call's key, or run ``call`` and cache what it returns.

        Raises:
            Whatever ``call`` raises (never cached).
        """
        if not self.policy.enabled:
            return await call()
        key = self._key(ctx)
        if key is None:
            return await call()
        full = self._full(key)
        found = await self._alookup(full) if self._async else self._lookup(full)
        extras = ctx.extras
        if extras is None:
            extras = ctx.extras = {}
        if not isinstance(found, _Miss):
            extras["cache_hit"] = True
            telemetry.note_result(cache_hit=True)
            return cast(T, found)
        extras["cache_hit"] = False
        result = await call()
        # a coalesced follower got the leader's result, which the leader's own Cache.run stores: store once
        if not extras.get(FOLLOWER_EXTRA):
            if self._async:
                await self._afill(full, result, self.policy.ttl)
            else:
                self._fill(full, result, self.policy.ttl)
        return result


# --- decorator -----------------------------------------------------------------------------------------------


def cached(
    *,
    ttl: float | None = 3600.0,
    key: Callable[..., str | None] | None = None,
    **options: Any,
) -> Callable[[F], F]:
    """Cache the results of the decorated function (async or sync) in a :class:`Cache` of its own.

    The default key is :func:`cache_key` over the function's qualified name and a canonical JSON of its
    positional and keyword arguments. A call whose arguments are not JSON-serialisable bypasses the cache (it
    runs, uncached, logged at debug); so does a call for which a custom ``key(*args, **kwargs)`` returns
    ``None``. Results must be JSON-serialisable (or use ``encode``/``decode``), otherwise they are returned but
    not cached. Sync functions run on the same async core as the other decorators (see
    :func:`ragguard.decorators.guarded`). The wrapper's ``.cache`` attribute is the :class:`Cache`, e.g. for
    ``wrapper.cache.invalidate()`` (``await wrapper.cache.ainvalidate()`` with an asynchronous ``store``, e.g.
    ``store=RedisBackend(url).cache_store()``).

    Args:
        ttl: seconds an entry lives (``None``: no expiry).
        key: ``key(*args, **kwargs) -> str | None``, the call's key (scoped by the cache's namespace and scope).
        **options: other :class:`Cache` options (``namespace``, ``scope``, ``store`` (sync or async),
            ``encode``, ``clock``…).

    Raises:
        pydantic.ValidationError: an option is invalid (raised when decorating, naming the field).
    """
    Cache(ttl=ttl, **options)  # validate now, at decoration time

    def apply(fn: F) -> F:
        from ..decorators import guarded, qualified_name  # the decorators module imports the guards

        guard = Cache(ttl=ttl, **options)
        name = qualified_name(fn)

        def key_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
            if key is not None:
                return key(*args, **kwargs)
            try:
                return guard.key_for(None, "call", name, list(args), kwargs)
            except (TypeError, ValueError):
                logger.debug("ragguard cache: arguments of %s are not JSON-serialisable; bypassing", name)
                return None

        # a None key makes the Cache guard a pass-through for that call
        wrapper = guarded(guard, fn, extras=lambda args, kwargs: {"cache_key": key_of(args, kwargs)})
        setattr(wrapper, "cache", guard)  # noqa: B010 - the public handle for invalidation
        return wrapper

    return apply
