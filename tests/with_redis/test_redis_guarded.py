"""RedisBackend end to end: guarded OpenAI clients (real SDK, real HTTP, simulator) and decorators in separate
"instances" (one RedisBackend each) share one quota, one cache and one breaker through a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from openai import AsyncOpenAI

import ragguard
from ragguard.backends.redis import RedisBackend
from ragguard.cli.demo import DemoOptions, run_demo
from ragguard.testing import OpenAISimulator, Served, SimulatorConfig, serve

KEY = "sk-test-redis-0123456789"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 8}


@pytest.fixture
def limited() -> Iterator[Served[OpenAISimulator]]:
    # 600 RPM = 10 requests/s with a one-second burst of 10: two instances of 30 calls each need ~5 s
    config = SimulatorConfig.instant(rpm=600, tpm=None, burst_seconds=1.0)
    with serve(OpenAISimulator(config)) as served:
        yield served


async def _burst(served: Served[OpenAISimulator], backends: list[Any], calls: int) -> None:
    policy = ragguard.Policy(
        rate_limit={"rpm": 600, "burst_seconds": 0.5},
        retry={"attempts": 1},
        cache={"enabled": False},
        coalesce={"enabled": False},
    )
    clients = [
        ragguard.guard(AsyncOpenAI(base_url=served.base_url, api_key=KEY), policy, backend=backend)
        for backend in backends
    ]
    try:
        async with anyio.create_task_group() as tg:
            for client in clients:
                for i in range(calls):
                    tg.start_soon(
                        lambda c=client, i=i: c.embeddings.create(model="text-embedding-3-small", input=f"t{i}")
                    )
    except Exception:
        pass  # the unshared run is expected to fail calls with 429s (retries are off)
    finally:
        for client in clients:
            await client.close()


@pytest.mark.openai
@pytest.mark.anyio
async def test_two_instances_share_one_quota_through_redis(
    limited: Served[OpenAISimulator], redis_flushed: str
) -> None:
    backends = [RedisBackend(redis_flushed, timeout=2.0), RedisBackend(redis_flushed, timeout=2.0)]
    await _burst(limited, backends, 20)
    stats = limited.stats()
    assert stats.requests_total == 40
    assert stats.rate_limited_total == 0
    for backend in backends:
        await backend.aclose()


@pytest.mark.openai
@pytest.mark.anyio
async def test_without_redis_the_instances_overrun_the_quota(limited: Served[OpenAISimulator]) -> None:
    await _burst(limited, [ragguard.MemoryBackend(), ragguard.MemoryBackend()], 20)
    assert limited.stats().rate_limited_total > 0  # each instance spends the whole quota


@pytest.mark.openai
@pytest.mark.anyio
async def test_the_response_cache_is_shared_between_instances(redis_flushed: str) -> None:
    with serve(OpenAISimulator(SimulatorConfig.instant(rpm=None, tpm=None))) as served:
        answers = []
        for _ in range(2):
            backend = RedisBackend(redis_flushed, timeout=2.0)
            client = ragguard.guard(AsyncOpenAI(base_url=served.base_url, api_key=KEY), backend=backend)
            answers.append(await client.chat.completions.create(**CHAT))
            answers.append(await client.embeddings.create(model="text-embedding-3-small", input="shared"))
            await client.close()
            await backend.aclose()
        assert served.stats().requests_total == 2  # the second instance read both from Redis
        assert answers[2].model_dump() == answers[0].model_dump()
        assert answers[3].data[0].embedding == answers[1].data[0].embedding


@pytest.mark.anyio
async def test_decorators_share_a_bucket_and_a_breaker_across_instances(redis_flushed: str) -> None:
    first, second = RedisBackend(redis_flushed, timeout=2.0), RedisBackend(redis_flushed, timeout=2.0)

    def limited(backend: RedisBackend) -> Any:
        @ragguard.rate_limit(rpm=60, burst_seconds=2.0, max_wait=0, backend=backend, name="search")
        async def search() -> str:
            return "ok"

        return search

    a, b = limited(first), limited(second)
    assert await a() == "ok"
    assert await b() == "ok"  # the bucket holds 2 (60/min × 2 s): both instances spent it
    with pytest.raises(ragguard.RateLimitTimeout):
        await a()

    def fragile(backend: RedisBackend) -> Any:
        @ragguard.circuit_breaker("rerank", backend=backend, failure_threshold=2, open_duration=30)
        async def rerank(fail: bool) -> str:
            if fail:
                raise ConnectionError("upstream down")
            return "ok"

        return rerank

    x, y = fragile(first), fragile(second)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await x(True)
    with pytest.raises(ragguard.CircuitOpenError):
        await y(False)  # opened by the other instance's failures
    for backend in (first, second):
        await backend.aclose()


@pytest.mark.openai
def test_demo_workers_share_one_quota_through_redis(redis_flushed: str) -> None:
    options = DemoOptions(
        users=120, rpm=3000, tpm=1_000_000, modes=("guarded",), workers=2, redis=redis_flushed, rag=False
    )
    report = anyio.run(run_demo, options)
    [guarded] = report.modes
    assert guarded.succeeded == 120
    assert guarded.upstream_429 <= 0.01 * guarded.upstream_requests
    assert [w.users for w in guarded.workers] == [60, 60]
    assert sum(w.succeeded for w in guarded.workers) == 120


def test_policy_lease_reaches_the_shared_limiter_and_a_local_one_ignores_it(redis_url: str) -> None:
    from ragguard import _stateful
    from ragguard.config import RateLimitPolicy

    section = RateLimitPolicy(rpm=600, lease=5)
    shared = _stateful.rate_limiter(
        RedisBackend(redis_url, timeout=2.0), "bucket", section, clock=ragguard.SYSTEM_CLOCK
    )
    assert isinstance(shared, ragguard.SharedRateLimiter)
    assert shared.lease == 5
    local = _stateful.rate_limiter(ragguard.MemoryBackend(), "bucket", section, clock=ragguard.SYSTEM_CLOCK)
    assert isinstance(local, ragguard.RateLimiter)
    with pytest.raises(ValueError, match="lease"):
        RateLimitPolicy(lease=0)


@pytest.mark.anyio
async def test_acl_user_and_password_come_from_the_url() -> None:
    from ragguard.testing import RedisServer

    with RedisServer(username="app", password="s3cret-pass") as server:
        good = RedisBackend(f"redis://app:s3cret-pass@127.0.0.1:{server.port}/0")
        assert await good.ping()
        assert "s3cret-pass" not in repr(good)  # the password never reaches logs
        bad = RedisBackend(f"redis://app:wrong@127.0.0.1:{server.port}/0")
        assert not await bad.ping()  # refused: reported unavailable, not raised
        await good.aclose()
        await bad.aclose()


@pytest.mark.openai
def test_sync_clients_share_the_cache_through_redis(redis_flushed: str) -> None:
    from openai import OpenAI

    with serve(OpenAISimulator(SimulatorConfig.instant(rpm=None, tpm=None))) as served:
        for _ in range(2):
            with ragguard.guard(
                OpenAI(base_url=served.base_url, api_key=KEY), backend=RedisBackend(redis_flushed, timeout=2.0)
            ) as client:
                assert client.chat.completions.create(**CHAT).choices
        assert served.stats().requests_total == 1
