"""The Redis cache store behind ``Cache``: real Redis (a server, a 3-node cluster), no fakes.

Covers: round trips of SDK responses, TTLs, the value-size bound, tenant scoping, no credential in keys,
invalidation limited to a namespace and scope (glob characters included), planted pickles rejected and never
run, Redis down or hung (calls still succeed, then the cache recovers), and a Redis Cluster.
"""

from __future__ import annotations

import os
import pickle
import shlex
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from redis.client import Redis

from ragguard import BackendUnavailable, CallContext, ManualClock
from ragguard.backends._redis_cache import RedisCacheStore, glob_escape
from ragguard.backends.redis import RedisBackend
from ragguard.guards._cache_store import is_async_store
from ragguard.guards.cache import (
    AsyncCacheStore,
    Cache,
    CacheStore,
    JsonSerializer,
    MemoryCacheStore,
    MsgpackSerializer,
    Serializer,
    cached,
    fingerprint,
)
from ragguard.testing.redis_server import RedisServer

pytestmark = pytest.mark.anyio


def unique() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def redis_backend(url: str, **options: Any) -> AsyncIterator[RedisBackend]:
    options.setdefault("namespace", unique())
    options.setdefault("timeout", 2.0)  # generous: these tests are not about timeouts, and CI machines stall
    backend = RedisBackend(url, **options)
    try:
        yield backend
    finally:
        await backend.aclose()


def ctx_for(key: str) -> CallContext:
    ctx = CallContext(clock=ManualClock())
    ctx.extras = {"cache_key": key}
    return ctx


class Counter:
    """An async call that returns ``value`` and counts how often it ran."""

    def __init__(self, value: Any = "fresh") -> None:
        self.value = value
        self.calls = 0

    async def __call__(self) -> Any:
        self.calls += 1
        return self.value


def raw_keys(url: str, pattern: str) -> list[bytes]:
    with Redis.from_url(url) as client:
        return sorted(client.scan_iter(match=pattern))


EMBEDDING = CreateEmbeddingResponse.model_validate(
    {
        "object": "list",
        "model": "text-embedding-3-small",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.125, -0.5, 1e-7]},
            {"object": "embedding", "index": 1, "embedding": [0.0, 2.5, -3.0]},
        ],
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
    }
)

CHAT = ChatCompletion.model_validate(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "Bonjour, « monde » ✓"},
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
    }
)


# --- the store and the protocol ---------------------------------------------------------------------------


async def test_the_redis_store_is_an_async_store_and_the_memory_store_is_not(redis_url: str) -> None:
    async with redis_backend(redis_url) as backend:
        store = backend.cache_store()
        assert isinstance(store, RedisCacheStore)
        assert backend.cache_store() is store  # one per backend
        assert isinstance(store, AsyncCacheStore)
        assert is_async_store(store)
        assert not is_async_store(MemoryCacheStore())
        assert isinstance(MemoryCacheStore(), CacheStore)
        with pytest.raises(ValueError, match="max_value_bytes"):
            RedisCacheStore(backend, max_value_bytes=0)


async def test_store_operations_and_counters(redis_url: str) -> None:
    async with redis_backend(redis_url) as backend:
        store = backend.cache_store()
        assert await store.get("k") is None
        assert await store.set("k", b"\x00\xffvalue", None)
        assert await store.get("k") == b"\x00\xffvalue"
        assert (store.hits, store.misses, store.evictions) == (1, 1, 0)
        # under the backend namespace + ":cache:", away from limiter and breaker keys
        assert raw_keys(redis_url, f"{backend.namespace}*") == [f"{backend.namespace}:cache:k".encode()]
        assert await store.delete("k")
        assert not await store.delete("k")
        assert not await store.set("k", b"v", 0.0)  # a ttl <= 0 stores nothing
        assert await store.get("k") is None


# --- round trips of SDK responses -------------------------------------------------------------------------


@pytest.mark.parametrize("serializer", [JsonSerializer(), MsgpackSerializer()], ids=["json", "msgpack"])
async def test_round_trip_of_embeddings_and_chat_responses(redis_url: str, serializer: Serializer) -> None:
    async with redis_backend(redis_url) as backend:
        store = backend.cache_store()
        for response in (EMBEDDING, CHAT):
            model = type(response)
            cache = Cache(
                store=store,
                namespace=f"openai.{model.__name__}",
                serializer=serializer,
                encode=lambda r: r.model_dump(mode="json"),
                decode=model.model_validate,
            )
            key = cache.key_for(None, "model", ["input"])
            call = Counter(response)
            assert await cache.run(call, ctx_for(key)) == response  # miss: filled
            ctx = ctx_for(key)
            hit = await cache.run(call, ctx)
            assert ctx.extras == {"cache_key": key, "cache_hit": True}
            assert isinstance(hit, model)
            assert hit == response
            assert hit is not response
            assert call.calls == 1
            assert (cache.hits, cache.misses, cache.unavailable) == (1, 1, 0)
            # a second process (another backend, same Redis and namespace) reads the same entry
            async with redis_backend(redis_url, namespace=backend.namespace) as other:
                reader = Cache(store=other.cache_store(), namespace=cache.policy.namespace, serializer=serializer)
                assert model.model_validate(await reader.get(key)) == response


# --- ttl and size -----------------------------------------------------------------------------------------


async def test_entries_expire_after_their_ttl_in_redis(redis_url: str) -> None:
    async with redis_backend(redis_url) as backend:
        cache = Cache(store=backend.cache_store(), ttl=0.2)
        assert await cache.set("short", [1, 2])
        assert await cache.set("long", "kept", ttl=60)
        assert await cache.get("short") == [1, 2]
        with Redis.from_url(redis_url) as client:
            pttl = client.pttl(backend.cache_store().redis_key(cache._full("short")))
        assert 0 < pttl <= 200  # PX in milliseconds
        await anyio.sleep(0.3)
        assert await cache.get("short", "gone") == "gone"
        assert await cache.get("long") == "kept"


async def test_a_value_above_max_value_bytes_is_not_stored_and_drops_the_old_one(redis_url: str) -> None:
    async with redis_backend(redis_url) as backend:
        store = backend.cache_store(max_value_bytes=16)
        assert store.max_value_bytes == 16
        cache = Cache(store=store)
        assert await cache.set("k", "small")  # '"small"': 7 bytes
        assert await cache.set("other", "x")
        assert not await cache.set("k", "much too long for it")
        assert await cache.get("k", "miss") == "miss"  # never a stale read
        assert await cache.get("other") == "x"
        # through the guard: returned, not cached
        call = Counter("a result longer than sixteen bytes")
        assert await cache.run(call, ctx_for("big")) == call.value
        assert await cache.run(call, ctx_for("big")) == call.value
        assert call.calls == 2


# --- tenants and credentials ------------------------------------------------------------------------------


async def test_a_tenant_never_reads_another_tenants_entry(redis_url: str) -> None:
    async with redis_backend(redis_url) as backend:
        store = backend.cache_store()
        tenant_a = Cache(store=store, scope="a")
        tenant_b = Cache(store=store, scope="b")
        key_a = tenant_a.key_for(None, "same", "question")
        key_b = tenant_b.key_for(None, "same", "question")
        assert key_a != key_b
        assert await tenant_a.set(key_a, "a's answer")
        assert await tenant_b.get(key_b, "miss") == "miss"
        assert await tenant_b.get(key_a, "miss") == "miss"  # a's full key is re-scoped under b
        call = Counter("b's answer")
        assert await tenant_b.run(call, ctx_for(key_a)) == "b's answer"
        assert await tenant_a.get(key_a) == "a's answer"  # b's fill went to b's scope
        assert await tenant_b.get(key_a) == "b's answer"


async def test_keys_in_redis_hold_no_credential_in_clear(redis_url: str) -> None:
    secret = "sk-proj-THIS-IS-SECRET-0123456789"
    async with redis_backend(redis_url) as backend:
        cache = Cache(store=backend.cache_store(), namespace="openai.embeddings", scope=fingerprint(secret))
        key = cache.key_for(fingerprint(secret), "text-embedding-3-small", ["hello"])
        assert await cache.set(key, [0.5])
        keys = raw_keys(redis_url, f"{backend.namespace}:*")
        assert len(keys) == 1
        assert secret.encode() not in keys[0]
        assert b"SECRET" not in keys[0]
        assert keys[0].startswith(f"{backend.namespace}:cache:openai.embeddings:{fingerprint(secret)}:".encode())


# --- invalidation -----------------------------------------------------------------------------------------


async def test_ainvalidate_removes_only_its_namespace_and_scope(redis_url: str) -> None:
    async with redis_backend(redis_url) as backend, redis_backend(redis_url) as neighbour:
        store = backend.cache_store()
        mine = Cache(store=store, namespace="emb", scope="t1")
        caches = [
            mine,
            Cache(store=store, namespace="emb", scope="t10"),  # a longer scope with mine as prefix
            Cache(store=store, namespace="emb", scope="t2"),
            Cache(store=store, namespace="emb"),
            Cache(store=store, namespace="embx", scope="t1"),
            Cache(store=neighbour.cache_store(), namespace="emb", scope="t1"),  # another backend namespace
        ]
        for cache in caches:
            for i in range(3):
                assert await cache.set(f"k{i}", i)
        with pytest.raises(TypeError, match="ainvalidate"):
            mine.invalidate()
        assert await mine.ainvalidate("k1") == 1
        assert await mine.get("k1", "gone") == "gone"
        assert await mine.ainvalidate() == 2
        assert await mine.ainvalidate() == 0
        for cache in caches[1:]:
            assert [await cache.get(f"k{i}") for i in range(3)] == [0, 1, 2]


async def test_delete_prefix_escapes_glob_characters(redis_url: str) -> None:
    async with redis_backend(redis_url) as backend:
        store = backend.cache_store()
        tricky = Cache(store=store, namespace="n[sx]*?", scope="*")
        bystanders = [
            Cache(store=store, namespace="ns", scope="*"),  # matched by the unescaped pattern n[sx]*
            Cache(store=store, namespace="nx", scope="a"),
            Cache(store=store, namespace="n[sx]*?", scope="b"),
        ]
        for cache in (tricky, *bystanders):
            assert await cache.set("k", "v")
        assert await tricky.ainvalidate() == 1
        assert await tricky.get("k", "gone") == "gone"
        for cache in bystanders:
            assert await cache.get("k") == "v"
    assert glob_escape("a*b?[c]\\d^-") == "a\\*b\\?\\[c\\]\\\\d\\^\\-"


async def test_delete_prefix_walks_many_scan_steps_and_unlink_batches(redis_url: str) -> None:
    async with redis_backend(redis_url) as backend:
        store = backend.cache_store()
        with Redis.from_url(redis_url) as client, client.pipeline(transaction=False) as pipe:
            for i in range(1234):
                pipe.set(store.redis_key(f"bulk:-:{i}"), b"1")
            pipe.set(store.redis_key("bulkier:-:0"), b"1")
            pipe.execute()
        assert await store.delete_prefix("bulk:") == 1234
        assert await store.get("bulkier:-:0") == b"1"
        await store.clear()
        assert raw_keys(redis_url, f"{backend.namespace}:*") == []
        assert (store.hits, store.misses) == (0, 0)


async def test_the_cached_decorator_with_the_redis_store(redis_url: str) -> None:
    async with redis_backend(redis_url) as backend:
        calls: list[int] = []

        @cached(store=backend.cache_store(), ttl=60, namespace="deco")
        async def square(x: int) -> int:
            calls.append(x)
            return x * x

        assert [await square(3), await square(3), await square(4)] == [9, 9, 16]
        assert calls == [3, 4]
        assert await square.cache.ainvalidate() == 2  # type: ignore[attr-defined]
        assert await square(3) == 9
        assert calls == [3, 4, 3]


def test_a_sync_function_cached_in_redis_through_the_sync_bridge(redis_url: str) -> None:
    backend = RedisBackend(redis_url, namespace=unique())
    calls: list[int] = []

    @cached(store=backend.cache_store(), ttl=60)
    def increment(x: int) -> int:
        calls.append(x)
        return x + 1

    assert [increment(1), increment(1), increment(2)] == [2, 2, 3]
    assert calls == [1, 2]
    assert increment.cache.hits == 1  # type: ignore[attr-defined]


# --- security: never pickle -------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this runs ``touch <path>``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.path))}",))


@pytest.mark.parametrize("serializer", [JsonSerializer(), MsgpackSerializer()], ids=["json", "msgpack"])
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
async def test_a_planted_pickle_is_rejected_deleted_and_never_executed(
    redis_url: str, tmp_path: Path, serializer: Serializer, protocol: int
) -> None:
    canary = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(canary), protocol=protocol)
    async with redis_backend(redis_url) as backend:
        store = backend.cache_store()
        cache = Cache(store=store, serializer=serializer, scope="victim")
        key = cache.key_for(None, "question")
        name = store.redis_key(key)
        with Redis.from_url(redis_url) as client:
            client.set(name, payload)
            assert await cache.get(key, "miss") == "miss"
            assert client.exists(name) == 0  # the planted entry is deleted
            client.set(name, payload)
            call = Counter("fresh")
            ctx = ctx_for(key)
            assert await cache.run(call, ctx) == "fresh"
            assert ctx.extras is not None
            assert ctx.extras["cache_hit"] is False
            assert serializer.loads(client.get(name)) == "fresh"  # replaced by a serialised value
        assert cache.hits == 0
        assert cache.misses == 2
    assert not canary.exists()
    pickle.loads(payload)  # the canary is live: unpickling it is what would have run
    assert canary.exists()


async def test_a_non_string_value_under_a_cache_key_is_a_miss_and_removed(redis_url: str) -> None:
    async with redis_backend(redis_url) as backend:
        store = backend.cache_store()
        cache = Cache(store=store)
        key = cache.key_for(None, "q")
        with Redis.from_url(redis_url) as client:
            client.hset(store.redis_key(key), "f", "v")
            assert await cache.get(key, "miss") == "miss"
            assert client.exists(store.redis_key(key)) == 0


# --- Redis down or hung: calls still succeed, then the cache recovers -------------------------------------


@pytest.mark.parametrize("on_unavailable", ["fail_open", "fail_closed"])
async def test_redis_down_then_back_calls_still_succeed(redis_server: RedisServer, on_unavailable: str) -> None:
    async with redis_backend(redis_server.url, on_unavailable=on_unavailable) as backend:
        cache = Cache(store=backend.cache_store())
        call = Counter("fresh")
        assert await cache.run(call, ctx_for("k")) == "fresh"
        assert await cache.run(call, ctx_for("k")) == "fresh"
        assert (call.calls, cache.hits) == (1, 1)

        redis_server.kill()
        for _ in range(2):
            ctx = ctx_for("k")
            assert await cache.run(call, ctx) == "fresh"  # served uncached: a miss, never an error
            assert ctx.extras is not None
            assert ctx.extras["cache_hit"] is False
        assert await cache.get("k", "miss") == "miss"
        assert not await cache.set("k", "x")
        assert call.calls == 3
        assert cache.unavailable >= 5  # 3 lookups + 2 fills + 1 set
        assert backend.last_error is not None
        with pytest.raises(BackendUnavailable):  # an invalidation that did not happen is reported
            await cache.ainvalidate()

        await anyio.to_thread.run_sync(redis_server.restart)  # empty again
        down = cache.unavailable
        results = [await cache.run(call, ctx_for("k")) for _ in range(3)]
        assert results == ["fresh"] * 3
        assert call.calls == 4  # one miss fills the restarted Redis; the next calls hit
        assert cache.unavailable == down
        assert backend.last_error is None


async def test_a_hung_redis_is_a_miss_and_replies_stay_in_order_after(redis_server: RedisServer) -> None:
    async with redis_backend(redis_server.url, timeout=0.2) as backend:
        cache = Cache(store=backend.cache_store())
        for name in ("a", "b", "c"):
            assert await cache.set(name, name.upper())
        redis_server.pause()
        try:
            assert await cache.run(Counter("fresh a"), ctx_for("a")) == "fresh a"  # timed out: miss, no fill
            assert await cache.get("b", "miss") == "miss"
            assert cache.unavailable == 3
        finally:
            redis_server.resume()
        # a reply to a timed-out command must never answer a later one
        assert [await cache.get(name) for name in ("c", "b", "a")] == ["C", "B", "A"]


# --- Redis Cluster ----------------------------------------------------------------------------------------


async def test_cluster_round_trip_scoping_and_invalidation_across_every_primary(redis_cluster_url: str) -> None:
    async with redis_backend(redis_cluster_url, cluster=True, timeout=2.0) as backend:
        store = backend.cache_store()
        mine = Cache(
            store=store,
            scope="a",
            encode=lambda r: r.model_dump(mode="json"),
            decode=CreateEmbeddingResponse.model_validate,
        )
        theirs = Cache(store=store, scope="b")
        keys = [mine.key_for(None, "input", i) for i in range(60)]
        for key in keys:
            assert await mine.set(key, EMBEDDING)
            assert await theirs.set(key, "b")
        assert await mine.get(keys[0]) == EMBEDDING
        assert await theirs.get(keys[0]) == "b"

        client = backend.client()
        nodes = {client.get_node_from_key(store.redis_key(key)).name for key in keys}
        assert len(nodes) == len(client.get_primaries()) == 3  # the entries live on every primary

        assert await mine.ainvalidate() == 60
        assert await mine.get(keys[0], "gone") == "gone"
        assert [await theirs.get(key) for key in keys] == ["b"] * 60
        assert await theirs.ainvalidate() == 60
