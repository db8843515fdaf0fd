from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ragguard
from ragguard import CallContext, ManualClock, Pipeline, Retry
from ragguard.guards.cache import (
    Cache,
    CachePolicy,
    JsonSerializer,
    MemoryCacheStore,
    MsgpackSerializer,
    Serializer,
    cache_key,
    cached,
    fingerprint,
)


def ctx_for(key: str | None, clock: ManualClock | None = None) -> CallContext:
    ctx = CallContext(clock=clock or ManualClock())
    if key is not None:
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


# --- policy -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": -1.0}, "ttl"),
        ({"max_entries": 0}, "max_entries"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"namespace": ""}, "namespace"),
    ],
)
def test_invalid_options_name_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        Cache(**options)
    assert field in str(info.value)


def test_policy_is_frozen_and_forbids_unknown_fields() -> None:
    policy = CachePolicy()
    assert (policy.enabled, policy.ttl, policy.max_entries, policy.max_bytes) == (True, 3600.0, 10_000, 64 * 2**20)
    assert (policy.namespace, policy.scope) == ("ragguard", None)
    with pytest.raises(pydantic.ValidationError):
        CachePolicy(ttl_seconds=3)  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError):
        policy.ttl = 5.0
    assert CachePolicy(ttl=None).ttl is None


def test_from_policy_uses_the_section_and_extras() -> None:
    clock = ManualClock()
    cache = Cache.from_policy(CachePolicy(ttl=5.0, namespace="emb", scope="t1", max_entries=3), clock=clock)
    assert cache.policy == CachePolicy(ttl=5.0, namespace="emb", scope="t1", max_entries=3)
    assert cache.stage == "cache"
    assert cache.clock is clock
    assert isinstance(cache.store, MemoryCacheStore)
    assert cache.store.max_entries == 3


# --- the guard: hit, miss, bypass ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_miss_then_hit() -> None:
    cache = Cache(clock=ManualClock())
    call = Counter({"vector": [0.5, 1.0]})
    first = ctx_for("k")
    assert await cache.run(call, first) == {"vector": [0.5, 1.0]}
    assert first.extras == {"cache_key": "k", "cache_hit": False}
    second = ctx_for("k")
    assert await cache.run(call, second) == {"vector": [0.5, 1.0]}
    assert second.extras is not None
    assert second.extras["cache_hit"] is True
    assert call.calls == 1
    assert (cache.hits, cache.misses) == (1, 1)


@pytest.mark.anyio
async def test_no_key_bypasses_lookup_and_fill() -> None:
    cache = Cache(clock=ManualClock())
    call = Counter()
    assert await cache.run(call, ctx_for(None)) == "fresh"
    assert await cache.run(call, ctx_for(None)) == "fresh"
    assert call.calls == 2
    assert len(cache.store) == 0  # type: ignore[arg-type]
    assert (cache.hits, cache.misses) == (0, 0)


@pytest.mark.anyio
async def test_custom_key_function_and_extras_created_on_hit() -> None:
    cache = Cache(clock=ManualClock(), key=lambda ctx: ctx.operation)
    call = Counter()
    await cache.run(call, CallContext(operation="embeddings"))
    ctx = CallContext(operation="embeddings")
    assert ctx.extras is None
    await cache.run(call, ctx)
    assert ctx.extras == {"cache_hit": True}
    assert call.calls == 1


@pytest.mark.anyio
async def test_disabled_cache_passes_through() -> None:
    cache = Cache(enabled=False, clock=ManualClock())
    call = Counter()
    await cache.run(call, ctx_for("k"))
    await cache.run(call, ctx_for("k"))
    assert call.calls == 2
    assert await cache.get("k") is None


@pytest.mark.anyio
async def test_cached_none_is_a_hit() -> None:
    cache = Cache(clock=ManualClock())
    call = Counter(None)
    await cache.run(call, ctx_for("k"))
    assert await cache.run(call, ctx_for("k")) is None
    assert call.calls == 1


@pytest.mark.anyio
async def test_errors_are_never_cached() -> None:
    cache = Cache(clock=ManualClock())
    calls = 0

    async def failing() -> str:
        nonlocal calls
        calls += 1
        raise ConnectionError("upstream down")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await cache.run(failing, ctx_for("k"))
    assert calls == 2
    assert len(cache.store) == 0  # type: ignore[arg-type]
    assert await cache.run(Counter("ok"), ctx_for("k")) == "ok"
    assert await cache.get("k") == "ok"


@pytest.mark.anyio
async def test_unserialisable_result_is_returned_but_not_cached() -> None:
    cache = Cache(clock=ManualClock())
    value = object()
    call = Counter(value)
    assert await cache.run(call, ctx_for("k")) is value
    assert await cache.run(call, ctx_for("k")) is value
    assert call.calls == 2
    assert len(cache.store) == 0  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_inside_a_pipeline_a_hit_skips_the_retry_stage() -> None:
    clock = ManualClock()
    cache = Cache(clock=clock)
    pipeline = Pipeline(Retry(attempts=2, clock=clock), cache, clock=clock)
    assert [type(g).__name__ for g in pipeline.guards] == ["Cache", "Retry"]
    call = Counter([1, 2])
    for _ in range(3):
        ctx = pipeline.context()
        ctx.extras = {"cache_key": "q"}
        assert await pipeline.run(call, ctx) == [1, 2]
    assert call.calls == 1


# --- expiry and bounds --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_ttl_expiry_on_the_injected_clock() -> None:
    clock = ManualClock()
    cache = Cache(ttl=10.0, clock=clock)
    call = Counter()
    await cache.run(call, ctx_for("k"))
    clock.advance(9.999)
    await cache.run(call, ctx_for("k"))
    assert call.calls == 1
    clock.advance(0.001)
    await cache.run(call, ctx_for("k"))
    assert call.calls == 2
    assert cache.store.expirations == 1  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_no_ttl_never_expires_and_set_can_override_ttl() -> None:
    clock = ManualClock()
    forever = Cache(ttl=None, clock=clock)
    await forever.set("k", 1)
    short = Cache(ttl=100.0, clock=clock)
    await short.set("k", 1, ttl=1.0)
    clock.advance(1e9)
    assert await forever.get("k") == 1
    assert await short.get("k", "gone") == "gone"


def test_store_ttl_none_and_lazy_expiry_on_read() -> None:
    clock = ManualClock()
    store = MemoryCacheStore(clock=clock)
    store.set("a", b"1", 5.0)
    store.set("b", b"2", None)
    clock.advance(5.0)
    assert len(store) == 2  # lazy: nothing dropped until read or insert
    assert store.get("a") is None
    assert store.get("b") == b"2"
    assert (len(store), store.bytes, store.expirations, store.hits, store.misses) == (1, 1, 1, 1, 1)


def test_lru_eviction_by_entries() -> None:
    store = MemoryCacheStore(max_entries=2, clock=ManualClock())
    store.set("a", b"1", None)
    store.set("b", b"2", None)
    assert store.get("a") == b"1"  # a is now the most recently used
    store.set("c", b"3", None)
    assert store.get("b") is None
    assert store.get("a") == b"1"
    assert store.get("c") == b"3"
    assert store.evictions == 1


def test_lru_eviction_by_bytes() -> None:
    store = MemoryCacheStore(max_entries=100, max_bytes=10, clock=ManualClock())
    store.set("a", b"aaaa", None)
    store.set("b", b"bbbb", None)
    store.set("c", b"cccc", None)  # 12 bytes > 10: the least recently used (a) goes
    assert store.get("a") is None
    assert (store.get("b"), store.get("c")) == (b"bbbb", b"cccc")
    assert store.bytes == 8
    store.set("d", b"dddddddddd", None)  # exactly max_bytes: everything else goes
    assert (len(store), store.bytes, store.evictions) == (1, 10, 3)


def test_expired_entries_reached_by_eviction_count_as_expirations() -> None:
    clock = ManualClock()
    store = MemoryCacheStore(max_entries=1, clock=clock)
    store.set("a", b"1", 1.0)
    clock.advance(2.0)
    store.set("b", b"2", None)
    assert (store.expirations, store.evictions, len(store)) == (1, 0, 1)


def test_oversize_value_is_not_stored_and_drops_the_old_value() -> None:
    store = MemoryCacheStore(max_bytes=4, clock=ManualClock())
    assert store.set("k", b"old", None)
    assert store.set("other", b"x", None)
    assert not store.set("k", b"too long", None)
    assert store.get("k") is None  # never a stale read
    assert store.get("other") == b"x"  # nothing evicted for a value that cannot fit
    assert store.bytes == 1


@pytest.mark.anyio
async def test_oversize_value_through_the_guard_is_returned_uncached() -> None:
    cache = Cache(max_bytes=8, clock=ManualClock())
    call = Counter("a long answer")
    assert await cache.run(call, ctx_for("k")) == "a long answer"
    assert await cache.run(call, ctx_for("k")) == "a long answer"
    assert call.calls == 2
    assert not await cache.set("k", "a long answer")


def test_store_delete_prefix_and_clear() -> None:
    store = MemoryCacheStore(clock=ManualClock())
    for key in ("ns1:a", "ns1:b", "ns2:a"):
        store.set(key, b"v", None)
    assert store.delete("ns2:a")
    assert not store.delete("ns2:a")
    store.set("ns2:a", b"v", None)
    assert store.delete_prefix("ns1:") == 2
    assert store.get("ns2:a") == b"v"
    store.clear()
    assert (len(store), store.bytes, store.hits) == (0, 0, 0)
    with pytest.raises(ValueError, match="max_entries"):
        MemoryCacheStore(max_entries=0)


def test_store_is_consistent_under_threads() -> None:
    store = MemoryCacheStore(max_entries=50, max_bytes=400, clock=ManualClock())

    def hammer(seed: int) -> None:
        for i in range(2_000):
            key = f"k{(seed * 7 + i) % 80}"
            if i % 3:
                store.set(key, b"x" * (i % 9), None)
            else:
                store.get(key)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store) <= 50
    assert store.bytes <= 400
    assert store.bytes == sum(len(v) for v, _ in store._data.values())


# --- serialisation: JSON, never pickle; corrupt entries -----------------------------------------------------


@pytest.mark.anyio
async def test_stored_bytes_are_compact_canonical_json_never_pickle() -> None:
    store = MemoryCacheStore(clock=ManualClock())
    cache = Cache(store=store, clock=ManualClock())
    await cache.set("k", {"b": "é", "a": (1, 2.5, None, True)})
    [(raw, _)] = store._data.values()
    assert not raw.startswith(b"\x80")  # the pickle protocol 2+ opcode
    assert raw == '{"a":[1,2.5,null,true],"b":"é"}'.encode()
    assert json.loads(raw) == {"a": [1, 2.5, None, True], "b": "é"}


@pytest.mark.anyio
async def test_objects_pickle_could_store_are_refused() -> None:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("pwned",))

    cache = Cache(clock=ManualClock())
    assert not await cache.set("k", Evil())
    assert not await cache.set("k", {1, 2})
    assert not await cache.set("k", float("nan"))
    assert len(cache.store) == 0  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize("garbage", [b"\x80\x04\x95garbage", b"{not json", b"\xff\xfe"])
async def test_corrupted_entry_is_a_miss_and_is_deleted(garbage: bytes) -> None:
    store = MemoryCacheStore(clock=ManualClock())
    cache = Cache(store=store, clock=ManualClock())
    full = cache.key_for(None, "query")
    store.set(full, garbage, None)
    call = Counter("fresh")
    ctx = ctx_for(full)
    assert await cache.run(call, ctx) == "fresh"
    assert ctx.extras is not None
    assert ctx.extras["cache_hit"] is False
    assert call.calls == 1
    assert store.get(full) == b'"fresh"'  # replaced by the fresh value
    assert cache.misses == 1


@pytest.mark.anyio
async def test_entry_the_decode_hook_rejects_is_a_miss_and_deleted() -> None:
    class Answer(pydantic.BaseModel):
        text: str

    store = MemoryCacheStore(clock=ManualClock())
    cache = Cache(store=store, decode=Answer.model_validate, clock=ManualClock())
    await Cache(store=store, clock=ManualClock()).set("k", {"unexpected": 1})
    assert await cache.get("k", "miss") == "miss"
    assert len(store) == 0


@pytest.mark.anyio
async def test_encode_decode_hooks_cache_pydantic_models() -> None:
    class Embedding(pydantic.BaseModel):
        index: int
        vector: list[float]

    cache = Cache(encode=lambda m: m.model_dump(mode="json"), decode=Embedding.model_validate, clock=ManualClock())
    call = Counter(Embedding(index=0, vector=[0.25, 0.5]))
    await cache.run(call, ctx_for("k"))
    hit = await cache.run(call, ctx_for("k"))
    assert isinstance(hit, Embedding)
    assert hit == Embedding(index=0, vector=[0.25, 0.5])
    assert call.calls == 1


@pytest.mark.anyio
async def test_a_custom_serializer_is_used() -> None:
    class Reversed:
        def dumps(self, obj: Any) -> bytes:
            return JsonSerializer().dumps(obj)[::-1]

        def loads(self, data: bytes) -> Any:
            return JsonSerializer().loads(data[::-1])

    assert isinstance(Reversed(), Serializer)
    store = MemoryCacheStore(clock=ManualClock())
    cache = Cache(store=store, serializer=Reversed(), clock=ManualClock())
    await cache.set("k", [1, "a"])
    assert await cache.get("k") == [1, "a"]
    assert next(iter(store._data.values()))[0] == b']"a",1['


def test_msgpack_serializer_is_optional() -> None:
    try:
        import msgpack  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError):
            MsgpackSerializer()
    else:  # pragma: no cover - only when msgpack happens to be installed
        serializer = MsgpackSerializer()
        assert serializer.loads(serializer.dumps({"a": [1, "b"]})) == {"a": [1, "b"]}


# --- keys: namespace, scope, credential ---------------------------------------------------------------------


def test_cache_key_shape_and_dict_order() -> None:
    key = cache_key("emb", "tenant-1", fingerprint("sk-secret"), "text-embedding-3-small", {"a": 1, "b": 2})
    namespace, scope, digest = key.split(":")
    assert (namespace, scope, len(digest)) == ("emb", "tenant-1", 64)
    assert int(digest, 16) >= 0
    assert key == cache_key("emb", "tenant-1", fingerprint("sk-secret"), "text-embedding-3-small", {"b": 2, "a": 1})
    assert cache_key("emb", None, None).startswith("emb:-:")
    # the "-" placeholder of no scope is not the scope "-"
    assert cache_key("emb", None, None, "x") != cache_key("emb", "-", None, "x")
    with pytest.raises(TypeError):
        cache_key("emb", None, None, object())
    with pytest.raises(ValueError, match="JSON"):
        cache_key("emb", None, None, float("inf"))


def test_fingerprint_hides_the_secret() -> None:
    secret = "sk-live-1234567890"
    fp = fingerprint(secret)
    assert len(fp) == 16
    assert int(fp, 16) >= 0
    assert fp == fingerprint(secret) != fingerprint(secret + "x")
    assert fp != hashlib.sha256(secret.encode()).hexdigest()[:16]  # domain-separated
    assert secret not in cache_key("ns", None, fp, "q")


@pytest.mark.anyio
async def test_scopes_and_namespaces_sharing_a_store_never_cross_read() -> None:
    store = MemoryCacheStore(clock=ManualClock())
    tenant_a = Cache(store=store, scope="a", clock=ManualClock())
    tenant_b = Cache(store=store, scope="b", clock=ManualClock())
    other_ns = Cache(store=store, namespace="other", scope="a", clock=ManualClock())
    await tenant_a.run(Counter("A"), ctx_for("same"))
    call = Counter("B")
    assert await tenant_b.run(call, ctx_for("same")) == "B"
    assert await other_ns.run(call, ctx_for("same")) == "B"
    assert call.calls == 2
    assert await tenant_a.get("same") == "A"
    # a key already in another tenant's space is re-scoped, not trusted
    a_key = tenant_a.key_for(None, "q")
    await tenant_a.set(a_key, "secret-of-a")
    assert await tenant_a.get(a_key) == "secret-of-a"
    assert await tenant_b.get(a_key) is None


@pytest.mark.anyio
async def test_different_credentials_get_different_entries() -> None:
    cache = Cache(clock=ManualClock())
    key_1 = cache.key_for(fingerprint("sk-one"), "model", "hello")
    key_2 = cache.key_for(fingerprint("sk-two"), "model", "hello")
    assert key_1 != key_2
    await cache.set(key_1, "for one")
    assert await cache.get(key_2) is None


@pytest.mark.anyio
async def test_invalidate_clears_only_its_own_namespace_and_scope() -> None:
    store = MemoryCacheStore(clock=ManualClock())
    mine = Cache(store=store, namespace="emb", scope="t1", clock=ManualClock())
    theirs = Cache(store=store, namespace="emb", scope="t2", clock=ManualClock())
    await mine.set("user:1", 1)
    await mine.set("user:2", 2)
    await mine.set("doc:1", 3)
    await theirs.set("user:1", 4)
    assert mine.invalidate("user:") == 2
    assert await mine.get("doc:1") == 3
    assert mine.invalidate() == 1
    assert await theirs.get("user:1") == 4


# --- decorator ----------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cached_async_function() -> None:
    calls: list[tuple[str, int]] = []

    @cached(ttl=60.0, clock=ManualClock())
    async def embed(text: str, *, dims: int = 3) -> list[float]:
        """Embed."""
        calls.append((text, dims))
        return [float(len(text))] * dims

    assert embed.__doc__ == "Embed."
    assert embed.__name__ == "embed"
    assert await embed("hi") == [2.0, 2.0, 2.0]
    assert await embed("hi") == [2.0, 2.0, 2.0]
    assert await embed("hi", dims=2) == [2.0, 2.0]
    assert await embed("hey") == [3.0, 3.0, 3.0]
    assert calls == [("hi", 3), ("hi", 2), ("hey", 3)]
    cache: Cache = embed.cache  # type: ignore[attr-defined]
    assert cache.hits == 1
    assert cache.invalidate() == 3
    await embed("hi")
    assert len(calls) == 4


@pytest.mark.anyio
async def test_cached_bypasses_unserialisable_arguments_and_results() -> None:
    calls = 0

    @cached(clock=ManualClock())
    async def work(arg: Any) -> Any:
        nonlocal calls
        calls += 1
        return arg if not isinstance(arg, str) else {"set": {1}} if arg == "bad" else arg

    marker = object()
    assert await work(marker) is marker
    assert await work(marker) is marker
    assert calls == 2
    assert await work("bad") == {"set": {1}}
    assert await work("bad") == {"set": {1}}
    assert calls == 4
    assert len(work.cache.store) == 0  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_cached_with_a_custom_key() -> None:
    calls = 0

    @cached(key=lambda user, query: None if user == "anon" else f"{user}:{query}", clock=ManualClock())
    async def search(user: str, query: str) -> str:
        nonlocal calls
        calls += 1
        return f"{user}/{query}/{calls}"

    assert await search("u1", "q") == await search("u1", "q") == "u1/q/1"
    assert await search("anon", "q") != await search("anon", "q")
    assert calls == 3
    assert await search.cache.get("u1:q") == "u1/q/1"  # type: ignore[attr-defined]


def test_cached_sync_function() -> None:
    calls: list[int] = []
    threads: list[str] = []

    @cached(ttl=60.0)
    def square(x: int) -> int:
        calls.append(x)
        threads.append(threading.current_thread().name)
        return x * x

    assert square(3) == 9
    assert square(3) == 9
    assert square(4) == 16
    assert calls == [3, 4]
    assert threading.current_thread().name not in threads  # ran through the async core's worker

    @cached()
    def identity(x: Any) -> Any:
        calls.append(-1)
        return x

    marker = object()
    assert identity(marker) is marker
    assert identity(marker) is marker
    assert calls.count(-1) == 2


def test_cached_sync_errors_are_not_cached() -> None:
    calls = 0

    @cached()
    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return "ok"

    with pytest.raises(RuntimeError):
        flaky()
    assert flaky() == "ok"
    assert flaky() == "ok"
    assert calls == 2


def test_cached_validates_options_when_decorating() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        cached(ttl=0)
    assert "ttl" in str(info.value)


# --- properties ---------------------------------------------------------------------------------------------

KEYS = st.sampled_from([f"k{i}" for i in range(8)])
VALUES = st.binary(max_size=16)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), KEYS, VALUES),
        st.tuples(st.just("get"), KEYS, st.just(b"")),
        st.tuples(st.just("delete"), KEYS, st.just(b"")),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_store_agrees_with_a_dict_when_under_its_bounds(ops: list[tuple[str, str, bytes]]) -> None:
    store = MemoryCacheStore(max_entries=100, max_bytes=10_000, clock=ManualClock())
    model: dict[str, bytes] = {}
    for op, key, value in ops:
        if op == "set":
            assert store.set(key, value, None)
            model[key] = value
        elif op == "get":
            assert store.get(key) == model.get(key)
        else:
            assert store.delete(key) == (key in model)
            model.pop(key, None)
        assert len(store) == len(model)
        assert store.bytes == sum(map(len, model.values()))


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 24),
    st.lists(st.tuples(st.booleans(), KEYS, VALUES, st.sampled_from([None, 0.5, 2.0]), st.floats(0, 1)), max_size=60),
)
def test_store_bounds_always_hold(
    max_entries: int, max_bytes: int, ops: list[tuple[bool, str, bytes, float | None, float]]
) -> None:
    clock = ManualClock()
    store = MemoryCacheStore(max_entries=max_entries, max_bytes=max_bytes, clock=clock)
    for is_set, key, value, ttl, step in ops:
        clock.advance(step)
        if is_set:
            stored = store.set(key, value, ttl)
            assert stored == (len(value) <= max_bytes)
            if stored and ttl is None:
                assert store.get(key) == value  # the value just set survives its own insert
        else:
            store.get(key)
        assert len(store) <= max_entries
        assert store.bytes <= max_bytes
        assert store.bytes == sum(len(v) for v, _ in store._data.values())


JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5)
)
JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=8,
)
KEY_INPUTS = st.tuples(
    st.one_of(st.none(), st.text(max_size=4)),
    st.one_of(st.none(), st.text(alphabet="0123456789abcdef", min_size=16, max_size=16)),
    st.lists(JSON, max_size=3),
)


def _normal(value: Any) -> Any:
    """What canonical JSON sees: ``1 == 1.0 == True`` are different JSON texts, so compare by text."""
    return json.dumps(value, sort_keys=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(KEY_INPUTS, min_size=2, max_size=6, unique_by=lambda t: _normal(t)))
def test_cache_keys_of_different_inputs_never_collide(inputs: list[tuple[Any, Any, list[Any]]]) -> None:
    keys = {cache_key("ns", scope, credential, *parts) for scope, credential, parts in inputs}
    assert len(keys) == len(inputs)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=4), JSON, max_size=6), st.randoms(use_true_random=False))
def test_equal_inputs_give_equal_keys_whatever_the_dict_order(mapping: dict[str, Any], rnd: Any) -> None:
    items = list(mapping.items())
    rnd.shuffle(items)
    shuffled = dict(items)
    assert cache_key("ns", "t", None, mapping, [mapping]) == cache_key("ns", "t", None, shuffled, [shuffled])


# --- retrieval keys -------------------------------------------------------------------------------------------


def test_retrieval_keys_cover_every_part_of_a_vector_query() -> None:
    base: dict[str, Any] = {
        "index": "docs",
        "vector": [0.1, 0.2, 0.3],
        "top_k": 5,
        "vector_namespace": "en",
        "filter": {"lang": "en", "year": {"$gte": 2020}},
    }
    key = ragguard.retrieval_cache_key("ns", "tenant", "cred", **base)
    same = ragguard.retrieval_cache_key(
        "ns", "tenant", "cred", **{**base, "vector": (0.1, 0.2, 0.3), "filter": {"year": {"$gte": 2020}, "lang": "en"}}
    )
    assert key == same  # sequence type and filter key order do not matter
    variants = [
        {"index": "other"},
        {"vector": [0.1, 0.2, 0.30000001]},
        {"top_k": 6},
        {"vector_namespace": "fr"},
        {"filter": {"lang": "fr"}},
        {"include_metadata": True},
    ]
    keys = {ragguard.retrieval_cache_key("ns", "tenant", "cred", **{**base, **v}) for v in variants}
    keys.add(ragguard.retrieval_cache_key("ns", "other-tenant", "cred", **base))
    keys.add(ragguard.retrieval_cache_key("ns", "tenant", "other-cred", **base))
    assert key not in keys
    assert len(keys) == len(variants) + 2
    assert "0.1" not in key  # the vector is hashed, never spelled out


@pytest.mark.anyio
async def test_a_retrieval_function_cached_by_its_query() -> None:
    calls = 0

    def key(vector: list[float], *, top_k: int, filter: dict[str, Any] | None = None) -> str:
        return ragguard.retrieval_cache_key(
            "search", None, None, index="docs", vector=vector, top_k=top_k, filter=filter
        )

    @ragguard.cached(ttl=60, key=key)
    async def search(vector: list[float], *, top_k: int, filter: dict[str, Any] | None = None) -> list[str]:
        nonlocal calls
        calls += 1
        return [f"doc-{i}" for i in range(top_k)]

    assert await search([1.0, 0.0], top_k=2) == ["doc-0", "doc-1"]
    assert await search([1.0, 0.0], top_k=2) == ["doc-0", "doc-1"]
    assert await search([1.0, 0.0], top_k=3, filter={"a": 1}) == ["doc-0", "doc-1", "doc-2"]
    assert calls == 2
