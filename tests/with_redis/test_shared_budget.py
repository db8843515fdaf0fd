"""SharedRetryBudget on a real Redis: "instances" (separate RedisBackend objects, as separate processes would have)
spend one retry budget by name; with Redis down, ``fail_open`` falls back to a local share and ``fail_closed``
refuses retries, never first attempts."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pydantic
import pytest
from redis.client import Redis

import ragguard
from ragguard import _stateful
from ragguard.backends.redis import RedisBackend
from ragguard.config import RetryBudgetPolicy
from ragguard.guards.budget import RetryBudget, RetryBudgetExhausted, SharedRetryBudget
from ragguard.testing.redis_server import RedisServer


def unique_name() -> str:
    return f"test-{uuid.uuid4().hex}"


class Instances:
    """Backends made by a test, closed at its end."""

    def __init__(self) -> None:
        self.backends: list[RedisBackend] = []

    def backend(self, url: str, **options: Any) -> RedisBackend:
        options.setdefault("timeout", 2.0)  # not a test of timeouts: a loaded machine may be slow to connect
        backend = RedisBackend(url, **options)
        self.backends.append(backend)
        return backend

    def budgets(self, url: str, n: int = 2, *, backend_options: Any = None, **settings: Any) -> list[SharedRetryBudget]:
        """``n`` budgets with one name on ``n`` backends: ``n`` instances of an app."""
        name = unique_name()
        return [
            SharedRetryBudget(name, store=self.backend(url, **(backend_options or {})), **settings) for _ in range(n)
        ]


@pytest.fixture
async def instances() -> AsyncIterator[Instances]:
    made = Instances()
    yield made
    for backend in made.backends:
        await backend.aclose()


class Upstream:
    """A provider that is down: every attempt fails with a retryable 503 (counted)."""

    def __init__(self) -> None:
        self.attempts = 0

    async def search(self, query: str) -> str:
        self.attempts += 1
        error = RuntimeError(f"HTTP 503 ({query})")
        error.status_code = 503  # type: ignore[attr-defined]
        raise error


async def grants(budget: SharedRetryBudget, asks: int) -> int:
    return sum([await budget.try_acquire_retry() for _ in range(asks)])


# --- one budget for every instance -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_two_instances_spend_one_budget(redis_url: str, instances: Instances) -> None:
    a, b = instances.budgets(redis_url, ratio=0.5, min_retries_per_s=0.0, flush_interval=0.0)
    for _ in range(6):
        await a.deposit()
    await b.deposit(4)
    granted = [await budget.try_acquire_retry() for budget in (a, b) * 4]
    assert sum(granted) == 5  # 0.5 × the 10 requests of both, not 0.5 × each one's own
    assert granted[:5] == [True] * 5
    stats = await b.stats()
    assert (stats.window_requests, stats.window_retries, stats.available) == (10, 5, 0)
    assert (stats.requests, stats.retries, stats.refused) == (4, 2, 2)  # this instance's own counters
    assert (a.retries, a.refused) == (3, 1)


@pytest.mark.anyio
async def test_deposits_are_batched_and_a_retry_carries_its_own(redis_url: str, instances: Instances) -> None:
    a, b = instances.budgets(redis_url, ratio=0.5, min_retries_per_s=0.0, flush_interval=60.0)
    for _ in range(10):
        await a.deposit()
    assert a.round_trips == 1  # the first deposit went at once, the other nine wait
    assert not await b.try_acquire_retry()  # B sees one request: 0.5 retries, none allowed (the bound holds)
    assert await a.try_acquire_retry()  # A's retry carries its nine pending requests first
    assert a.round_trips == 2
    assert await b.try_acquire_retry()
    assert await grants(b, 5) == 3  # 0.5 × 10 = 5 in all
    assert (await b.stats()).window_retries == 5


@pytest.mark.anyio
async def test_the_window_slides_on_the_server_clock(redis_url: str, instances: Instances) -> None:
    (budget,) = instances.budgets(
        redis_url, 1, ratio=0.5, min_retries_per_s=0.0, window_s=0.4, buckets=4, flush_interval=0.0
    )
    await budget.deposit(2)
    assert await grants(budget, 3) == 1
    await anyio.sleep(0.45)  # every bucket of the window has expired
    assert not await budget.try_acquire_retry()
    assert (await budget.stats()).window_requests == 0
    await budget.deposit(4)
    assert await grants(budget, 3) == 2


@pytest.mark.anyio
async def test_the_key_hides_the_name_and_expires_with_the_window(redis_flushed: str, instances: Instances) -> None:
    name = "openai:sk-secret-fingerprint:embeddings"
    budget = SharedRetryBudget(
        name, store=instances.backend(redis_flushed), window_s=5.0, buckets=5, flush_interval=0.0
    )
    await budget.deposit()
    assert await budget.try_acquire_retry()
    with Redis.from_url(redis_flushed) as client:
        keys = [key.decode() for key in client.keys("*")]
        assert len(keys) == 1
        assert keys[0].startswith("ragguard:{budget:")
        assert "secret" not in keys[0]
        assert 4_000 < client.pttl(keys[0]) <= 6_000  # the window, plus a margin
    # budgets with another window never share a ring
    other = SharedRetryBudget(name, store=instances.backend(redis_flushed), window_s=10.0, flush_interval=0.0)
    assert (await other.stats()).window_requests == 0


@pytest.mark.anyio
async def test_two_guarded_clients_on_redis_share_one_budget_where_local_ones_each_have_their_own(
    redis_url: str, instances: Instances
) -> None:
    # no ratio, a floor of 1 retry/s over 10 s: 10 retries per window for the whole app
    policy = ragguard.Policy(
        retry={"attempts": 4, "base": 0.001, "cap": 0.002},
        retry_budget={"ratio": 0.0, "min_retries_per_s": 1.0, "window_s": 10.0},
        breaker={"enabled": False},
        cache={"enabled": False},
    )

    async def outage(backends: list[Any], calls: int) -> tuple[int, list[BaseException]]:
        upstream = Upstream()
        clients = [ragguard.guard(upstream, policy, methods={"search": None}, backend=b) for b in backends]
        refusals: list[BaseException] = []

        async def one(i: int) -> None:
            try:
                await clients[i % len(clients)].search(f"q{i}")
            except RetryBudgetExhausted as exc:
                refusals.append(exc)
            except ragguard.RetryExhausted:
                pass

        async with anyio.create_task_group() as tg:
            for i in range(calls):
                tg.start_soon(one, i)
        return upstream.attempts, refusals

    # the budget is named after the method: a namespace of its own keeps this run's window apart from others'
    namespace = unique_name()
    shared = [instances.backend(redis_url, namespace=namespace) for _ in range(2)]
    budget = _stateful.retry_budget(shared[0], "x", policy.retry_budget, clock=ragguard.SYSTEM_CLOCK)
    assert isinstance(budget, SharedRetryBudget)
    attempts, refusals = await outage(shared, 60)
    assert attempts == 60 + 10  # one floor for both instances
    assert len(refusals) >= 60 - 10 // 3  # only a call granted all three of its retries is not refused
    assert all(isinstance(exc.__cause__, RuntimeError) for exc in refusals)  # the provider's error, chained

    local = [ragguard.MemoryBackend() for _ in range(2)]
    assert isinstance(
        _stateful.retry_budget(local[0], "x", policy.retry_budget, clock=ragguard.SYSTEM_CLOCK), RetryBudget
    )
    attempts, _ = await outage(local, 60)
    assert attempts == 60 + 2 * 10  # a floor each: per-process budgets add up


# --- Redis unavailable ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_fail_open_falls_back_to_this_process_share_and_recovers(
    redis_server: RedisServer, instances: Instances
) -> None:
    # two instances expected: the fallback's floor is half of 1 retry/s over 10 s
    (budget,) = instances.budgets(
        redis_server.url,
        1,
        backend_options={"on_unavailable": "fail_open", "expected_instances": 2, "timeout": 0.5},
        ratio=0.5,
        min_retries_per_s=1.0,
        reconnect_interval=0.0,
        flush_interval=0.0,
    )
    assert budget.fallback.min_retries_per_s == 0.5
    await budget.deposit(2)
    assert await budget.try_acquire_retry()  # granted by Redis (and mirrored in the fallback's window)
    redis_server.kill()

    await budget.deposit(4)  # never raises: the fallback holds it
    assert budget.degraded
    # the fallback: 0.5 × 6 requests + 5 (its floor) = 8 retries, one of them spent while Redis was up
    assert await grants(budget, 10) == 7
    assert budget.fallbacks == 10
    stats = await budget.stats()
    assert (stats.window_requests, stats.window_retries) == (6, 8)

    await anyio.to_thread.run_sync(redis_server.restart)
    assert await budget.try_acquire_retry()  # an empty shared window after the restart: the floor
    assert not budget.degraded
    assert (await budget.stats()).window_retries == 1


@pytest.mark.anyio
async def test_fail_closed_refuses_retries_never_first_attempts(
    redis_server: RedisServer, instances: Instances
) -> None:
    backend = instances.backend(redis_server.url, on_unavailable="fail_closed", timeout=0.3)
    section = RetryBudgetPolicy(ratio=1.0, min_retries_per_s=10.0)
    budget = SharedRetryBudget.from_policy(section, store=backend, name=unique_name(), reconnect_interval=0.0)
    retry = ragguard.Retry(attempts=4, base=0.001, cap=0.002, budget=budget)
    upstream = Upstream()

    async def call() -> BaseException:
        with pytest.raises(ragguard.RetryExhausted) as info:
            await retry.call(upstream.search, "q")
        return info.value

    assert not isinstance(await call(), RetryBudgetExhausted)  # Redis up: the budget granted every retry
    assert upstream.attempts == 4
    redis_server.kill()
    for _ in range(3):
        refused = await call()
        assert isinstance(refused, RetryBudgetExhausted)
        assert isinstance(refused.__cause__, RuntimeError)  # the provider's error, chained
    assert upstream.attempts == 4 + 3  # every first attempt went; no retry did
    assert budget.degraded
    with pytest.raises(ragguard.BackendUnavailable):
        await budget.stats()

    await anyio.to_thread.run_sync(redis_server.restart)
    assert not isinstance(await call(), RetryBudgetExhausted)
    assert upstream.attempts == 7 + 4
    assert not budget.degraded


@pytest.mark.anyio
async def test_a_dead_redis_costs_one_timeout_per_reconnect_interval(
    redis_server: RedisServer, instances: Instances
) -> None:
    (budget,) = instances.budgets(
        redis_server.url, 1, backend_options={"on_unavailable": "fail_open", "timeout": 0.3}, reconnect_interval=60.0
    )
    redis_server.pause()  # hung: every operation would take the whole timeout
    try:
        await budget.deposit()
        assert budget.unavailable == 1
        with anyio.fail_after(0.1):  # not asked again for 60 s: answered locally, at once
            for _ in range(20):
                await budget.deposit()
                assert await budget.try_acquire_retry()
        assert budget.unavailable == 1
    finally:
        redis_server.resume()


def test_invalid_settings_are_refused(redis_url: str) -> None:
    backend = RedisBackend(redis_url)
    # the policy's numbers by RetryBudgetPolicy's rules, naming the field
    for field, bad in (
        ("ratio", -1.0),
        ("window_s", 0.0),
        ("buckets", 0),
        ("min_retries_per_s", float("inf")),
        ("ratio", float("nan")),
    ):
        with pytest.raises(pydantic.ValidationError) as info:
            SharedRetryBudget("x", store=backend, **{field: bad})
        assert [e["loc"] for e in info.value.errors()] == [(field,)]
    for settings in (
        {"flush_interval": -1.0},
        {"reconnect_interval": float("nan")},
        {"expected_instances": 0},
        {"on_unavailable": "maybe"},
    ):
        with pytest.raises(ragguard.ConfigError):
            SharedRetryBudget("x", store=backend, **settings)
    with pytest.raises(ragguard.ConfigError, match="budget"):
        ragguard.Retry(budget=object())  # type: ignore[arg-type]
