"""Security of the state ragguard keeps in Redis, attacked through a real Redis, the real openai SDK and the
OpenAI simulator on loopback.

- A pickle planted under the exact key a guarded client's cache reads is never unpickled: the call is a miss,
  goes upstream, and the entry is replaced by JSON.
- Key names never hold an API key (nor its plain sha256) nor prompt text; values never hold the API key.
- Two API keys asking the same thing through one Redis never share an answer.
- Redis runs only the module's Lua constants (by ``EVALSHA``), whatever names, namespaces and scopes say.
- Hostile cache namespaces, scopes, bucket names and backend namespaces never read, invalidate or reset
  another app's keys; ``SCAN`` patterns match their prefix literally.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI
from redis.client import Redis

import ragguard
from ragguard.backends import _redis_breaker, _redis_bucket, _redis_budget
from ragguard.backends._redis_cache import glob_escape
from ragguard.backends.redis import RedisBackend
from ragguard.config import BreakerPolicy
from ragguard.guards.cache import Cache, cache_key
from ragguard.providers.openai import _credential_scope
from ragguard.testing import OpenAISimulator, Served, SimulatorConfig, serve
from ragguard.testing.redis_server import RedisServer

pytestmark = pytest.mark.anyio

KEY_A = "sk-proj-SECRET-a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6"
KEY_B = "sk-proj-SECRET-ffeeddccbbaa99887766554433221100"
PROMPT = "Which zebra guards the quartz lantern 7f3c9e?"
CHAT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": PROMPT}],
    "temperature": 0,
    "max_tokens": 16,
}
EMBED: dict[str, Any] = {"model": "text-embedding-3-small", "input": PROMPT}


@pytest.fixture
def served() -> Iterator[Served[OpenAISimulator]]:
    with serve(OpenAISimulator(SimulatorConfig.instant(rpm=None, tpm=None))) as running:
        yield running


@asynccontextmanager
async def guarded(
    served: Served[OpenAISimulator], url: str, api_key: str, policy: ragguard.Policy | None = None
) -> AsyncIterator[Any]:
    """A guarded AsyncOpenAI client on a RedisBackend of its own (as another process would have)."""
    backend = RedisBackend(url, timeout=2.0)
    client = ragguard.guard(AsyncOpenAI(base_url=served.base_url, api_key=api_key), policy, backend=backend)
    try:
        yield client
    finally:
        await client.close()
        await backend.aclose()


def scan(url: str, pattern: str = "*") -> list[bytes]:
    with Redis.from_url(url) as client:
        return sorted(client.scan_iter(match=pattern, count=1000))


def value_bytes(client: Any, key: bytes) -> bytes:
    """Everything stored under ``key``, whatever its type, as one byte string."""
    kind = client.type(key)
    if kind == b"string":
        return bytes(client.get(key) or b"")
    if kind == b"hash":
        return b"\x00".join(k + b"=" + v for k, v in client.hgetall(key).items())
    if kind == b"list":
        return b"\x00".join(client.lrange(key, 0, -1))
    if kind == b"set":
        return b"\x00".join(sorted(client.smembers(key)))
    if kind == b"zset":
        return b"\x00".join(member for member, _ in client.zrange(key, 0, -1, withscores=True))
    raise AssertionError(f"{key!r} has a type these tests do not read: {kind!r}")


# --- a planted pickle under a guarded client's cache key ---------------------------------------------------


class _Exploit:
    """Unpickling this runs ``touch <path>``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.path))}",))


def cache_entry_name(served: Served[OpenAISimulator], api_key: str, endpoint: str) -> str:
    """The Redis key a default-policy guarded client reads for ``CHAT`` or ``EMBED``, built the way the OpenAI
    provider builds it: ``cache_key(policy namespace, scope, credential fingerprint, ...)`` under the store's
    ``"{backend namespace}:cache:"``."""
    credential = _credential_scope(AsyncOpenAI(base_url=served.base_url, api_key=api_key))
    if endpoint == "chat.completions":
        key = cache_key("ragguard", None, credential, "openai", "chat.completions", CHAT)
    else:
        digest = hashlib.sha256(PROMPT.encode()).hexdigest()
        key = cache_key("ragguard", None, credential, "openai.embeddings", EMBED["model"], None, None, digest)
    return RedisBackend(namespace="ragguard").cache_store().redis_key(key)


async def create(client: Any, endpoint: str) -> Any:
    if endpoint == "chat.completions":
        return await client.chat.completions.create(**CHAT)
    return await client.embeddings.create(**EMBED)


@pytest.mark.openai
@pytest.mark.parametrize("endpoint", ["chat.completions", "embeddings"])
@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])
async def test_a_pickle_planted_under_a_guarded_clients_key_is_never_unpickled(
    served: Served[OpenAISimulator], redis_flushed: str, tmp_path: Path, endpoint: str, protocol: int
) -> None:
    canary = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(canary), protocol=protocol)
    name = cache_entry_name(served, KEY_A, endpoint)
    with Redis.from_url(redis_flushed) as raw:
        raw.set(name, payload)
        async with guarded(served, redis_flushed, KEY_A) as client:
            answer = await create(client, endpoint)
        assert not canary.exists()  # never unpickled
        assert served.stats().requests_total == 1  # a miss: the call went upstream
        # the planted entry was replaced by the fresh answer, as JSON, under that very key (and no other)
        assert scan(redis_flushed, "ragguard:cache:*") == [name.encode()]
        stored = raw.get(name)
        assert stored is not None
        assert not stored.startswith(b"\x80")
        assert json.loads(stored)
        if endpoint == "chat.completions":
            assert answer.choices[0].message.content.encode() in stored
    # another "process" now reads the replacement: a hit, the same answer
    async with guarded(served, redis_flushed, KEY_A) as client:
        again = await create(client, endpoint)
    assert served.stats().requests_total == 1
    if endpoint == "chat.completions":
        assert again.model_dump() == answer.model_dump()
    else:  # a rebuilt embeddings response: the same vectors, usage counting only what went upstream (nothing)
        assert [item.embedding for item in again.data] == [item.embedding for item in answer.data]
    assert not canary.exists()
    pickle.loads(payload)  # the canary is live: unpickling it is what would have run
    assert canary.exists()


# --- no secret and no prompt in key names --------------------------------------------------------------------


@pytest.mark.openai
async def test_keys_hold_no_api_key_nor_prompt_and_values_no_api_key(
    served: Served[OpenAISimulator], redis_flushed: str
) -> None:
    # every kind of shared state: caches, buckets (requests and tokens), breakers, retry budgets
    policy = ragguard.Policy.model_validate({"rate_limit": {"rpm": 6000, "tpm": 10_000_000}})
    async with guarded(served, redis_flushed, KEY_A, policy) as client:
        answer = await client.chat.completions.create(**CHAT)
        await client.embeddings.create(**EMBED)
        await client.embeddings.create(model="text-embedding-3-small", input=[PROMPT, PROMPT + " again"])
    keys = scan(redis_flushed)
    for kind in (b"ragguard:cache:", b"ragguard:{bucket:", b"ragguard:{breaker:", b"ragguard:{budget:"):
        assert any(key.startswith(kind) for key in keys), (kind, keys)
    key_sha = hashlib.sha256(KEY_A.encode()).hexdigest()
    prompt_sha = hashlib.sha256(PROMPT.encode()).hexdigest()
    secret = KEY_A.split("-")[-1]  # the random part alone
    in_clear = [KEY_A, secret, key_sha, key_sha[:16], PROMPT, "zebra", "quartz", prompt_sha, prompt_sha[:16]]
    for key in keys:
        text = key.decode()
        assert not [part for part in in_clear if part in text], text
    with Redis.from_url(redis_flushed) as raw:
        values = {key: value_bytes(raw, key) for key in keys}
    for key, value in values.items():
        for part in (KEY_A, secret, key_sha):
            assert part.encode() not in value, key
    # the values do hold the answers (this scan would see a secret if one were there)
    content = answer.choices[0].message.content
    assert any(content.encode() in value for value in values.values())


# --- two credentials, one Redis --------------------------------------------------------------------------------


@pytest.mark.openai
async def test_two_api_keys_with_the_same_prompt_never_share_an_answer_through_redis(
    served: Served[OpenAISimulator], redis_flushed: str
) -> None:
    for endpoint in ("chat.completions", "embeddings"):
        before = served.stats().requests_total
        async with guarded(served, redis_flushed, KEY_A) as first:
            await create(first, endpoint)
        assert served.stats().requests_total == before + 1
        async with guarded(served, redis_flushed, KEY_B) as second:
            await create(second, endpoint)
        assert served.stats().requests_total == before + 2  # B went upstream: A's entry was not B's
        for key in (KEY_A, KEY_B):  # each key's own entry serves it, in any process
            async with guarded(served, redis_flushed, key) as client:
                await create(client, endpoint)
        assert served.stats().requests_total == before + 2
    # one entry per key and endpoint, each under the name its own credential gives
    names = {
        cache_entry_name(served, key, endpoint).encode()
        for key in (KEY_A, KEY_B)
        for endpoint in ("chat.completions", "embeddings")
    }
    assert set(scan(redis_flushed, "ragguard:cache:*")) == names


# --- Redis runs only the Lua constants -------------------------------------------------------------------------


LUA = {
    name: value
    for module in (_redis_bucket, _redis_breaker, _redis_budget)
    for name, value in vars(module).items()
    if isinstance(value, str) and "redis.call(" in value
}


class RecordingBackend(RedisBackend):
    """A RedisBackend that remembers every script source its stores register."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sources: list[str] = []

    def script(self, source: str) -> Any:
        self.sources.append(source)
        return super().script(source)


HOSTILE_NAMES = [
    "app*",
    "app:",
    "ap[p]",
    "{app}",
    "a\nb",
    "x y",
    "äpp✓🚀",
    "a" * 10_240,
    "KEYS[1]'); redis.call('FLUSHALL",
]


async def test_redis_runs_only_the_lua_constants_whatever_the_names(redis_server: RedisServer) -> None:
    backend = RecordingBackend(redis_server.url, timeout=2.0)
    policy = BreakerPolicy()
    with Redis.from_url(redis_server.url) as raw:
        raw.set("sentinel", "still here")
        raw.script_flush()
        for name in HOSTILE_NAMES:
            buckets = backend.bucket_store()
            await buckets.reserve(name, 1.0, 1.0, 1.0, 0.0, 0.5)
            await buckets.check(name)
            breakers = backend.breaker_store()
            permit = await breakers.permit(name, policy)
            await breakers.record(name, policy, generation=permit.generation, success=False)
            await breakers.force_open(name, policy, 1.0)
            await breakers.snapshot(name, policy)
            await breakers.reset(name, policy)
            budgets = backend.budget_store()
            await budgets.deposit(name, 3, window_s=10.0, buckets=10)
            await budgets.acquire(name, deposit=1, ratio=0.2, floor=1.0, window_s=10.0, buckets=10)
            await budgets.snapshot(name, window_s=10.0, buckets=10)
        await backend.aclose()
        # every source registered is one of the module constants, the very object (never a formatted copy)
        assert backend.sources
        assert all(any(source is constant for constant in LUA.values()) for source in backend.sources)
        used = {name for name, constant in LUA.items() if any(source is constant for source in backend.sources)}
        assert used == {"BUCKET_SCRIPT", "BUDGET_SCRIPT", "_PERMIT", "_RECORD", "_FORCE_OPEN", "_SNAPSHOT", "_RESET"}
        # and Redis itself holds exactly those scripts: nothing else was EVAL'd or loaded
        assert int(raw.info("memory")["number_of_cached_scripts"]) == len(used)
        shas = [hashlib.sha1(LUA[name].encode()).hexdigest() for name in sorted(used)]  # Redis names scripts by SHA1
        assert raw.script_exists(*shas) == [True] * len(shas)
        assert raw.get("sentinel") == b"still here"
        keys = [key for key in raw.scan_iter(count=1000) if key != b"sentinel"]
    # names are hashed into the keys: none appears in clear
    assert keys
    for key in keys:
        assert not [name for name in HOSTILE_NAMES if len(name) > 3 and name.encode() in key], key


async def test_hostile_bucket_and_breaker_names_never_share_state(redis_flushed: str) -> None:
    backend = RedisBackend(redis_flushed, timeout=2.0)
    names = ["app", *HOSTILE_NAMES, "ap", "app:{bucket"]
    assert len(set(names)) == len(names)

    def limited(name: str) -> Any:
        # one request per minute: the first call spends the bucket, a second is refused
        @ragguard.rate_limit(rpm=1, burst_seconds=60, max_wait=0, backend=backend, name=name)
        async def call() -> str:
            return "ok"

        return call

    calls = [limited(name) for name in names]
    for call in calls:  # each name has a bucket of its own
        assert await call() == "ok"
    for call in calls:
        with pytest.raises(ragguard.RateLimitTimeout):
            await call()

    def fragile(name: str) -> Any:
        @ragguard.circuit_breaker(name, backend=backend, failure_threshold=1, open_duration=60)
        async def call(fail: bool) -> str:
            if fail:
                raise ConnectionError("down")
            return "ok"

        return call

    breakers = [fragile(name) for name in names]
    with pytest.raises(ConnectionError):
        await breakers[0](True)  # opens "app" only
    with pytest.raises(ragguard.CircuitOpenError):
        await breakers[0](False)
    for call in breakers[1:]:
        assert await call(False) == "ok"
    await backend.aclose()


# --- hostile cache namespaces and scopes; glob-escaped invalidation --------------------------------------------


HOSTILE = [
    "app*",
    "app:",
    "ap",
    "app?",
    "ap[p]",
    "app[a-z]",
    "{app}",
    "a:pp",
    "app\n",
    "app with spaces",
    "äpp✓ 🚀",
    "app\\*",
    "*",
    "a" * 10_240,
]


async def test_hostile_cache_namespaces_and_scopes_never_read_or_invalidate_each_other(redis_flushed: str) -> None:
    backend = RedisBackend(redis_flushed, timeout=2.0)
    store = backend.cache_store()
    caches = [Cache(store=store, namespace="app")]
    caches += [Cache(store=store, namespace=text) for text in HOSTILE]
    caches += [Cache(store=store, namespace="app", scope=text) for text in HOSTILE]

    async def fill(index: int) -> None:
        cache = caches[index]
        assert await cache.set("k", index)
        assert await cache.set(cache.key_for(None, "question"), index)

    async def contents() -> list[tuple[Any, Any]]:
        return [(await c.get("k"), await c.get(c.key_for(None, "question"))) for c in caches]

    for i in range(len(caches)):
        await fill(i)
    full = [(i, i) for i in range(len(caches))]
    assert await contents() == full
    assert len(scan(redis_flushed, "ragguard:cache:*")) == 2 * len(caches)
    for victim in range(len(caches)):
        assert await caches[victim].ainvalidate() == 2
        assert await contents() == [(None, None) if i == victim else (i, i) for i in range(len(caches))]
        await fill(victim)
    # a prefix given to ainvalidate is literal text too: "*" removes only keys that start with "*"
    for prefix in ("*", "?", "[a-z]", "k*", "\\", "-"):
        assert await caches[0].ainvalidate(prefix) == 0
    assert await contents() == full
    await backend.aclose()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prefix=st.text(alphabet="ab*?[]^-\\:{}% \n\x00é🚀", max_size=8),
    tail=st.text(alphabet="ab*?[]^-\\:{}% \n\x00é🚀", max_size=8),
    other=st.text(alphabet="ab*?[]^-\\:{}% \n\x00é🚀", max_size=16),
)
def test_the_scan_pattern_matches_its_prefix_literally(redis_url: str, prefix: str, tail: str, other: str) -> None:
    """``SCAN MATCH glob_escape(p) + "*"`` finds exactly the keys that start with ``p``, whatever ``p`` holds."""
    base = f"sec-glob-{uuid.uuid4().hex}:"
    keys = {base + prefix + tail, base + other}
    with Redis.from_url(redis_url) as client:
        for key in keys:
            client.set(key, "1")
        try:
            found = {key.decode() for key in client.scan_iter(match=glob_escape(base + prefix) + "*", count=1000)}
        finally:
            client.delete(*keys)
    assert found == {key for key in keys if key.startswith(base + prefix)}


# --- hostile backend namespaces --------------------------------------------------------------------------------

# a namespace with ':' is refused (it could spell the prefix of another app's keys)


@pytest.mark.parametrize(
    "namespace",
    [
        "app*",
        "app:",
        "ap",
        "app?",
        "app[a-z]",
        "app\n",
        "app with spaces",
        "äpp✓",
        "a" * 10_240,
        "app:cache",
    ],
    ids=lambda text: repr(text[:12]),
)
async def test_backends_with_hostile_namespaces_never_touch_each_others_state(
    redis_flushed: str, namespace: str
) -> None:
    mine = RedisBackend(redis_flushed, namespace="app", timeout=2.0)
    try:
        theirs = RedisBackend(redis_flushed, namespace=namespace, timeout=2.0)
    except pydantic.ValidationError:
        assert ":" in namespace  # refusing the separator is one fix of the collision; nothing else is refused
        return

    def limited(backend: RedisBackend) -> Any:
        @ragguard.rate_limit(rpm=1, burst_seconds=60, max_wait=0, backend=backend, name="search")
        async def call() -> str:
            return "ok"

        return call

    backends = (mine, theirs)
    caches = [Cache(store=backend.cache_store()) for backend in backends]
    calls = [limited(backend) for backend in backends]
    for value, (cache, call) in enumerate(zip(caches, calls, strict=True)):
        assert await cache.set("k", value)
        assert await call() == "ok"  # each namespace has its own bucket, now spent
    # a cache of mine whose namespace and scope spell the start of another backend's keys ("app" + ":cache:" +
    # "cache:ragguard:" is where the default cache of a backend named "app:cache" keeps its entries)
    crafted = Cache(store=mine.cache_store(), namespace="cache", scope="ragguard")
    assert await crafted.ainvalidate() == 0
    assert await caches[1].get("k") == 1
    for me in (0, 1):
        other = 1 - me
        assert await caches[me].ainvalidate() == 1
        await backends[me].cache_store().clear()  # the whole cache store of one backend
        assert await caches[other].get("k") == other  # the other app's entry survived both
        for call in calls:  # and both buckets are still spent: neither was deleted
            with pytest.raises(ragguard.RateLimitTimeout):
                await call()
        assert await caches[me].set("k", me)
    await mine.aclose()
    await theirs.aclose()


@pytest.mark.parametrize("namespace", ["{app}", "app{", "app}", ""])
def test_a_backend_namespace_that_could_break_hash_tags_is_refused(namespace: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="namespace"):
        RedisBackend(namespace=namespace)


# --- a cache whose scope cannot be a Redis key -----------------------------------------------------------------


async def test_a_cache_scope_redis_cannot_encode_never_fails_the_call(redis_flushed: str) -> None:
    backend = RedisBackend(redis_flushed, timeout=2.0)
    try:
        cache = Cache(store=backend.cache_store(), scope="tenant-\ud800")
    except Exception:  # refused when made: the fix
        await backend.aclose()
        return

    async def call() -> str:
        return "fresh"

    ctx = ragguard.CallContext()
    ctx.extras = {"cache_key": "k"}
    try:
        assert await cache.run(call, ctx) == "fresh"
    finally:
        await backend.aclose()
