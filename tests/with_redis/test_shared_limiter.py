"""SharedRateLimiter and RedisBucketStore on a real Redis.

Two RedisBackend objects stand for two processes. The bucket runs on the Redis server's clock; the limiters sleep
on ManualClocks (instant, recorded), so nothing here waits for real except the fault tests, which wait out
connection failures bounded by a short backend timeout.
"""

from __future__ import annotations

import itertools
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
import redis.asyncio

from ragguard import (
    BackendUnavailable,
    CallContext,
    ManualClock,
    Outcome,
    RateLimiter,
    RateLimitHeaders,
    RateLimitPolicy,
    RateLimitTimeout,
)
from ragguard.backends._redis_bucket import EXPIRY_MARGIN, BucketState, RedisBucketStore
from ragguard.backends.redis import RedisBackend
from ragguard.guards.shared_limiter import BucketStore, SharedRateLimiter
from ragguard.testing.redis_server import RedisServer

pytestmark = pytest.mark.anyio

# rpm 600: one request is 0.1 s of refill; tpm 6,000: one token is 0.01 s; burst 1 s: 10 requests, 100 tokens
RPM, TPM, BURST = 600.0, 6_000.0, 1.0
REQ, TOK = 60.0 / RPM, 60.0 / TPM


def unique_name() -> str:
    return f"test:{uuid.uuid4().hex}"


@pytest.fixture
async def backends(redis_flushed: str) -> AsyncIterator[Callable[..., RedisBackend]]:
    """Make RedisBackends on the session server (each one a "process"); closed at the end."""
    made: list[RedisBackend] = []

    def make(url: str = redis_flushed, **options: Any) -> RedisBackend:
        backend = RedisBackend(url, **options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


def limiter(backend: RedisBackend, name: str, **kwargs: Any) -> SharedRateLimiter:
    kwargs.setdefault("rpm", RPM)
    kwargs.setdefault("tpm", TPM)
    kwargs.setdefault("burst_seconds", BURST)
    kwargs.setdefault("clock", ManualClock())
    return SharedRateLimiter(backend, name=name, **kwargs)


async def state(limiter: SharedRateLimiter) -> BucketState:
    store = limiter.store
    assert isinstance(store, RedisBucketStore)
    return await store.check(limiter.name)


class RateLimited(Exception):
    """A provider's 429, with its wait hint."""

    def __init__(self, retry_after: float | None) -> None:
        super().__init__("429")
        self.retry_after = retry_after


def classify(exc: BaseException) -> Outcome:
    if isinstance(exc, RateLimited):
        return Outcome("rate_limit", retryable=True, failure=False, rate_limited=True, retry_after=exc.retry_after)
    return Outcome("other", retryable=False, failure=False)


async def ok() -> str:
    return "ok"


# ---------------------------------------------------------------- the schedule, against the local limiter


def test_the_redis_store_is_a_bucket_store(redis_url: str) -> None:
    assert isinstance(RedisBackend(redis_url).bucket_store(), BucketStore)


async def test_waits_and_refusals_match_the_local_limiter(backends: Callable[..., RedisBackend]) -> None:
    """The same calls against the Redis bucket and the local RateLimiter give the same schedule.

    The first call takes the whole tokens bucket, so every later call waits (the schedule then depends only on
    the costs, not on when the calls arrive): the Redis admission times (server now + wait) minus the first
    call's time equal the local limiter's waits from a frozen clock, to float precision. Refused calls (their
    budget too short) reserve nothing in either. RPM and TPM are charged together, an oversize cost goes when
    the bucket is full and leaves debt, as locally.
    """
    store = backends().bucket_store()
    name = unique_name()
    local = RateLimiter(rpm=RPM, tpm=TPM, burst_seconds=BURST, clock=ManualClock())
    first = await store.reserve(name, 1 * REQ, 100 * TOK, BURST, math.inf, 0.0)
    assert first[:4] == (True, 0.0, 0.0, 0.0)
    assert local.reserve(1, 100) == 0.0
    t0 = (await store.check(name)).tok_tat - 100 * TOK  # the server time of the first call
    calls = [
        (1, 50, math.inf),  # tokens decide: 0.5 s
        (2, 0, math.inf),  # no tokens: requests decide (not yet in debt), goes with the previous one
        (1, 30, 0.1),  # refused: needs ~0.8 s
        (12, 0, math.inf),  # requests beyond capacity: goes when full, leaves debt
        (1, 300, math.inf),  # tokens beyond capacity: goes when full, leaves debt
        (1, 10, 0.5),  # refused
        (0, 5, math.inf),
        (3, 20, math.inf),
    ]
    for requests, tokens, budget in calls:
        try:
            expected = local.reserve(requests, tokens, max_wait=budget)
            refused = False
        except RateLimitTimeout as exc:
            expected = exc.wait
            refused = True
        reply = await store.reserve(name, requests * REQ, tokens * TOK, BURST, budget, 0.0)
        assert reply.admitted is not refused, (requests, tokens, budget)
        assert reply.wait > 0.0
        assert reply.now + reply.wait - t0 == pytest.approx(expected, abs=1e-5), (requests, tokens)
    final = await store.check(name)
    assert final.req_tat - t0 == pytest.approx(BURST - local.available_requests * REQ, abs=1e-5)
    assert final.tok_tat - t0 == pytest.approx(BURST - local.available_tokens * TOK, abs=1e-5)


async def test_rpm_and_tpm_in_one_round_trip(backends: Callable[..., RedisBackend]) -> None:
    shared = limiter(backends(), unique_name())
    clock = shared.clock
    assert isinstance(clock, ManualClock)
    await shared.acquire(1, 40)
    await shared.acquire(1, 40)
    assert shared.round_trips == 2
    # the tokens bucket now holds 20 tokens: a call of 50 waits 0.3 s, the requests bucket is not the limit
    await shared.acquire(1, 50)
    assert clock.slept[0] == pytest.approx(0.3, abs=0.01)
    assert shared.round_trips == 4  # the reservation and one re-check after the sleep
    # charged at its admission time t0 + 0.3: requests t0 + 0.3 + 0.1, tokens t0 + 0.8 + 0.5
    s = await state(shared)
    assert s.tok_tat - s.req_tat == pytest.approx(0.9, abs=1e-3)


async def test_a_refused_call_raises_at_once_and_reserves_nothing(backends: Callable[..., RedisBackend]) -> None:
    shared = limiter(backends(), unique_name(), max_wait=0.2)
    await shared.acquire(1, 100)  # empties the tokens bucket
    before = await state(shared)
    with pytest.raises(RateLimitTimeout) as caught:
        await shared.acquire(1, 50)
    assert caught.value.wait == pytest.approx(0.5, abs=0.01)
    assert caught.value.remaining == 0.2
    assert shared.clock.slept == []  # type: ignore[attr-defined]
    after = await state(shared)
    assert (after.req_tat, after.tok_tat) == (before.req_tat, before.tok_tat)
    # the context deadline caps the wait too
    ctx = CallContext(clock=shared.clock, tokens=50, deadline=shared.clock.now() + 0.1)
    with pytest.raises(RateLimitTimeout):
        await shared.run(ok, ctx)


async def test_fifo_a_waiting_caller_keeps_its_slot(backends: Callable[..., RedisBackend]) -> None:
    """Each reservation is scheduled after every earlier one: admission times strictly follow the order in
    which Redis ran the reservations, spaced by the refill rate, whoever asks next."""
    a, b = backends(), backends()
    name = unique_name()
    stores = [a.bucket_store(), b.bucket_store()]
    for _ in range(10):
        await stores[0].reserve(name, REQ, 0.0, BURST, math.inf, 0.0)  # empty the requests bucket
    times = []
    for i in range(8):
        reply = await stores[i % 2].reserve(name, REQ, 0.0, BURST, math.inf, 0.0)
        times.append(reply.now + reply.wait)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps == pytest.approx([REQ] * 7, abs=1e-5)


# ---------------------------------------------------------------- reconciliation and provider feedback


@pytest.mark.parametrize(
    ("accounting", "used", "moved"),
    [
        ("openai", 4.0, 0.0),  # never refunded
        ("openai", 15.0, 5.0),  # under-estimate debited
        ("reconcile", 4.0, -6.0),  # refunded
        ("reconcile", 15.0, 5.0),
    ],
)
async def test_accounting(backends: Callable[..., RedisBackend], accounting: Any, used: float, moved: float) -> None:
    # 1 token per second of refill, so the bucket is deep in debt and refunds are not capped
    shared = limiter(backends(), unique_name(), tpm=60.0, accounting=accounting)
    await shared.acquire(0, 30)

    async def call() -> str:
        ctx.used_tokens = used
        return "ok"

    ctx = CallContext(clock=shared.clock, tokens=10)
    before = await state(shared)
    assert await shared.run(call, ctx) == "ok"
    after = await state(shared)
    # the reservation charged 10 tokens (10 s); then the settlement moved the tokens bucket by `moved` seconds
    assert after.tok_tat - before.tok_tat == pytest.approx(10.0 + moved, abs=1e-3)


async def test_headers_lower_the_shared_level_never_raise_it(backends: Callable[..., RedisBackend]) -> None:
    shared = limiter(backends(), unique_name())

    def call_with(headers: RateLimitHeaders) -> Callable[[], Any]:
        async def call() -> str:
            ctx.rate_headers = headers
            return "ok"

        return call

    ctx = CallContext(clock=shared.clock, tokens=10)
    await shared.run(call_with(RateLimitHeaders(remaining_requests=2, remaining_tokens=5_000)), ctx)
    s = await state(shared)
    # 2 requests left: the requests bucket is full again 0.8 s after the server's now
    assert s.req_tat - s.now == pytest.approx(BURST - 2 * REQ, abs=0.01)
    trips = shared.round_trips
    ctx = CallContext(clock=shared.clock, tokens=10)
    await shared.run(call_with(RateLimitHeaders(remaining_requests=500, remaining_tokens=50_000)), ctx)
    assert shared.round_trips == trips + 1  # a full bucket's worth left: nothing to lower, no round trip
    s2 = await state(shared)
    assert s2.req_tat == pytest.approx(s.req_tat + REQ, abs=1e-6)  # only the new call's charge


# ---------------------------------------------------------------- shared Retry-After


class HookClock(ManualClock):
    """A ManualClock that runs a hook (once) while the caller sleeps."""

    def __init__(self, hook: Callable[[], Any]) -> None:
        super().__init__()
        self.hook: Callable[[], Any] | None = hook

    async def sleep(self, seconds: float) -> None:
        hook, self.hook = self.hook, None
        if hook is not None:
            await hook()
        await super().sleep(seconds)


async def test_a_429_seen_by_one_instance_pauses_the_others(backends: Callable[..., RedisBackend]) -> None:
    name = unique_name()
    one = limiter(backends(), name)
    two = limiter(backends(), name, max_wait=1.0)

    async def throttled() -> None:
        raise RateLimited(retry_after=3.0)

    with pytest.raises(RateLimited):
        await one.run(throttled, CallContext(clock=one.clock, classify=classify))
    s = await state(two)
    assert s.paused_until - s.now == pytest.approx(3.0, abs=0.05)
    assert s.jitter_cap == pytest.approx(min(0.1 * 3.0, 3 * REQ))
    # the other instance is held: its wait covers the pause (plus at most the release jitter)
    with pytest.raises(RateLimitTimeout) as caught:
        await two.acquire(1, 0)
    assert 2.9 < caught.value.wait <= 3.0 + 0.3 + 0.05
    # the local fallback share paused too (the instance that saw the 429)
    assert one.fallback.paused_until > one.fallback.clock.now() + 2.9


async def test_a_pause_set_while_a_caller_sleeps_holds_it_too(backends: Callable[..., RedisBackend]) -> None:
    """The waiting caller re-checks the bucket after its sleep: a pause another instance set meanwhile moves
    its reservation back by the pause (block shift), so it sleeps again."""
    name = unique_name()
    pauser = limiter(backends(), name)
    clock = HookClock(lambda: pauser.pause(2.0))
    waiter = limiter(backends(), name, clock=clock)
    await waiter.acquire(10, 0)  # empty the requests bucket
    await waiter.acquire(1, 0)  # waits 0.1 s; meanwhile the pause starts
    assert len(clock.slept) == 2
    assert clock.slept[0] == pytest.approx(REQ, abs=0.01)
    # the reservation (due 0.1 s after the first call) moved back by the 2 s pause; on the server's clock only
    # milliseconds passed meanwhile (the ManualClock's sleep is instant), so about 2.1 s are left to sleep
    assert clock.slept[1] == pytest.approx(2.1, abs=0.05)
    assert waiter.round_trips == 4  # 2 reservations + 2 re-checks


async def test_a_pause_beyond_the_budget_refuses_the_sleeping_caller_and_refunds(
    backends: Callable[..., RedisBackend],
) -> None:
    name = unique_name()
    pauser = limiter(backends(), name)
    waiter = limiter(backends(), name, clock=HookClock(lambda: pauser.pause(5.0)), max_wait=1.0)
    await waiter.acquire(10, 0)
    with pytest.raises(RateLimitTimeout) as caught:
        await waiter.acquire(1, 0)
    assert caught.value.wait > 4.0
    s = await state(waiter)
    # the pause restarts the bucket empty at its end; the refunded reservation left no charge beyond that
    assert s.req_tat == pytest.approx(s.paused_until + BURST, abs=1e-6)


async def test_cancelled_while_waiting_gives_the_reservation_back(backends: Callable[..., RedisBackend]) -> None:
    shared = limiter(backends(), unique_name(), clock=ManualClock())
    await shared.acquire(10, 0)
    before = await state(shared)
    with anyio.CancelScope() as scope:

        class Cancelled(ManualClock):
            async def sleep(self, seconds: float) -> None:
                scope.cancel()
                await anyio.sleep_forever()

        shared.clock = Cancelled()
        await shared.acquire(1, 0)
    assert scope.cancelled_caught
    after = await state(shared)
    assert after.req_tat == pytest.approx(before.req_tat, abs=1e-6)


# ---------------------------------------------------------------- keys, clocks, scripts, cluster


async def test_keys_expire_when_idle(backends: Callable[..., RedisBackend], redis_flushed: str) -> None:
    shared = limiter(backends(), unique_name())
    await shared.acquire(10, 0)
    await shared.acquire(10, 0)  # 1 s of debt beyond the full bucket: full again ~2 s from now
    store = shared.store
    assert isinstance(store, RedisBucketStore)
    async with redis.asyncio.Redis.from_url(redis_flushed) as client:
        ttl = await client.pttl(store.key(shared.name))
    assert (2.0 + EXPIRY_MARGIN) * 1000 - 100 < ttl <= (2.0 + 2 * EXPIRY_MARGIN) * 1000
    # the key name holds no bucket name in clear
    assert shared.name not in store.key(shared.name)


async def test_the_server_clock_rules(backends: Callable[..., RedisBackend]) -> None:
    """Two instances whose local clocks are a day apart share the bucket exactly as if they agreed."""
    name = unique_name()
    early = limiter(backends(), name, clock=ManualClock(0.0), max_wait=0.05)
    late = limiter(backends(), name, clock=ManualClock(86_400.0), max_wait=0.05)
    await early.acquire(10, 0)  # empties the requests bucket
    with pytest.raises(RateLimitTimeout) as caught:
        await late.acquire(1, 0)  # a clock a day ahead earns nothing
    assert caught.value.wait == pytest.approx(REQ, abs=0.01)
    late.clock.advance(3_600.0)  # type: ignore[attr-defined]
    with pytest.raises(RateLimitTimeout):
        await late.acquire(1, 0)  # an hour of local time passing earns nothing either
    with pytest.raises(RateLimitTimeout) as caught:
        await early.acquire(1, 0)
    assert caught.value.wait == pytest.approx(REQ, abs=0.01)


async def test_the_script_survives_script_flush(backends: Callable[..., RedisBackend], redis_flushed: str) -> None:
    shared = limiter(backends(), unique_name())
    await shared.acquire(1, 1)
    async with redis.asyncio.Redis.from_url(redis_flushed) as client:
        await client.script_flush()
    await shared.acquire(1, 1)  # NOSCRIPT: reloaded and run in the same operation
    assert shared.round_trips == 2
    assert (shared.fallbacks, shared.unavailable) == (0, 0)


async def test_redis_cluster(redis_cluster_url: str) -> None:
    backend = RedisBackend(redis_cluster_url, cluster=True)
    try:
        name = unique_name()
        one = limiter(backend, name, max_wait=0.05)
        two = limiter(backend, name, max_wait=0.05)
        await one.acquire(5, 50)
        await two.acquire(5, 50)
        with pytest.raises(RateLimitTimeout):
            await one.acquire(1, 0)
        await two.pause(1.0)
        s = await state(one)
        assert s.paused_until - s.now == pytest.approx(1.0, abs=0.05)
        assert (one.round_trips, two.round_trips) == (2, 2)
    finally:
        await backend.aclose()


def test_from_policy_and_validation(redis_url: str) -> None:
    backend = RedisBackend(redis_url, on_unavailable="fail_closed", expected_instances=4)
    policy = RateLimitPolicy(rpm=1_200, tpm=40_000, burst_seconds=2.0, accounting="reconcile")
    shared = SharedRateLimiter.from_policy(policy, store=backend, name="m", lease=5)
    assert (shared.rpm, shared.tpm, shared.lease, shared.on_unavailable) == (1_200, 40_000, 5, "fail_closed")
    assert shared.expected_instances == 4
    assert (shared.fallback.rpm, shared.fallback.tpm) == (300, 10_000)  # this process's fair share
    assert shared.fallback.capacity_requests == pytest.approx(10.0)  # 300/60 · 2 s
    assert SharedRateLimiter.from_policy(policy, store=backend, on_unavailable="fail_open").on_unavailable == (
        "fail_open"
    )
    with pytest.raises(ValueError, match="lease"):
        SharedRateLimiter(backend, rpm=10, lease=0)
    with pytest.raises(ValueError, match="on_unavailable"):
        SharedRateLimiter(backend, rpm=10, on_unavailable="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected_instances"):
        SharedRateLimiter(backend, rpm=10, expected_instances=0)


# ---------------------------------------------------------------- lease mode


async def test_lease_mode_spends_locally_and_charges_the_block(backends: Callable[..., RedisBackend]) -> None:
    shared = limiter(backends(), unique_name(), lease=5)
    for _ in range(5):
        await shared.acquire(1, 4)
    assert (shared.round_trips, shared.leases, shared.lease_admissions) == (1, 1, 4)
    s = await state(shared)
    # one lease: 5 requests and 5 calls' tokens, charged at once
    assert s.req_tat - s.now == pytest.approx(5 * REQ, abs=0.01)
    assert s.tok_tat - s.now == pytest.approx(20 * TOK, abs=0.01)
    await shared.acquire(1, 4)  # spent: a new lease
    assert (shared.round_trips, shared.leases) == (2, 2)


async def test_lease_gives_back_its_remainder_with_the_next_lease(backends: Callable[..., RedisBackend]) -> None:
    shared = limiter(backends(), unique_name(), rpm=60.0, tpm=None, lease=5)  # 1 s per request
    clock = shared.clock
    assert isinstance(clock, ManualClock)
    await shared.acquire(1, 0)  # lease 1: 5 requests charged, 4 left
    first = await state(shared)
    clock.advance(10.0)  # the lease expires (lifetime: max(burst, 5 s))
    await shared.acquire(1, 0)  # lease 2 (the server clock moved ~nothing): 4 given back, 5 charged
    second = await state(shared)
    assert second.req_tat - first.req_tat == pytest.approx(5.0 - 4.0, abs=1e-3)


async def test_concurrent_callers_share_one_lease_request(backends: Callable[..., RedisBackend]) -> None:
    shared = limiter(backends(), unique_name(), rpm=60_000.0, tpm=None, lease=10, clock=ManualClock())
    order: list[int] = []

    async def caller(i: int) -> None:
        await shared.acquire(1, 0)
        order.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(25):
            tg.start_soon(caller, i)
    assert sorted(order) == list(range(25))
    assert shared.leases == 3  # 10 + 10 + 5 (one lease request in flight at a time)
    assert shared.lease_admissions == 22
    assert shared.round_trips == 3


class GateClock(ManualClock):
    """A ManualClock whose sleeps last until the test opens the gate (so callers can queue meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = anyio.Event()
        self.sleeping = anyio.Event()

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if seconds > 0:
            self.sleeping.set()
            await self.gate.wait()


async def test_lease_queue_refuses_at_once_whom_the_lease_in_flight_comes_too_late_for(
    backends: Callable[..., RedisBackend],
) -> None:
    name = unique_name()
    await limiter(backends(), name).acquire(10, 0)  # another instance empties the requests bucket
    clock = GateClock()
    shared = limiter(backends(), name, tpm=None, lease=5, clock=clock)
    done: list[str] = []

    async def first() -> None:
        await shared.acquire(1, 0)  # takes the lease: 0.5 s away
        done.append("first")

    async def patient() -> None:
        await shared.acquire(1, 0)  # queues behind it
        done.append("patient")

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await clock.sleeping.wait()  # the lease request got its answer: 0.5 s to wait
        tg.start_soon(patient)
        with pytest.raises(RateLimitTimeout) as caught:
            await shared.acquire(1, 0, deadline=clock.now() + 0.1)
        assert caught.value.wait == pytest.approx(0.5, abs=0.05)
        await anyio.wait_all_tasks_blocked()
        clock.gate.set()
    assert done == ["first", "patient"]
    assert (shared.leases, shared.lease_admissions) == (1, 1)


# ---------------------------------------------------------------- when Redis is down


async def test_fail_open_falls_back_to_the_local_share_and_recovers(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url, timeout=0.2, expected_instances=2, on_unavailable="fail_open")
    try:
        clock = ManualClock()
        shared = limiter(backend, unique_name(), clock=clock, tpm=None, backend_retry_after=5.0)
        await shared.acquire(1, 0)
        assert shared.round_trips == 1
        await anyio.to_thread.run_sync(redis_server.kill)
        # no call fails; the local share is 300 rpm (one request per 0.2 s) and starts empty: this process may
        # have spent the shared burst already
        for _ in range(10):
            await shared.acquire(1, 0)
        assert shared.fallbacks == 10
        assert shared.unavailable == 1  # then the store is not tried again for backend_retry_after
        assert [s for s in clock.slept if s > 1e-9] == pytest.approx([0.2] * 10)
        assert isinstance(backend.last_error, Exception)
        await anyio.to_thread.run_sync(redis_server.restart)  # empty: a full burst on offer
        clock.advance(5.0)  # past backend_retry_after: the next call tries Redis again
        clock.slept.clear()
        await shared.acquire(1, 0)
        # one round trip drains the shared bucket (the full burst of a restarted Redis is not trusted), one
        # reserves: one request interval (60 / 600 rpm) away, one re-checks after the sleep
        assert (shared.fallbacks, shared.round_trips) == (10, 4)
        assert [s for s in clock.slept if s > 1e-9] == pytest.approx([0.1], abs=0.01)  # on Redis TIME
        assert shared.last_error is None
    finally:
        await backend.aclose()


async def test_fail_open_carries_the_callers_waiting_on_one_path_over_to_the_other(redis_server: RedisServer) -> None:
    """Callers sleeping on a reservation still go after the limiter switched paths: the path taken over is charged
    with them (otherwise both paths' admissions add up and exceed the provider's quota)."""
    backend = RedisBackend(redis_server.url, timeout=0.2, expected_instances=2, on_unavailable="fail_open")
    clock = GateClock()  # every sleep lasts until the gate opens: the waiting callers stay waiting
    shared = limiter(backend, unique_name(), clock=clock, tpm=None, backend_retry_after=5.0)

    async def sleeping(n: int) -> None:  # until n sleeps began (Redis round trips are real I/O meanwhile)
        with anyio.fail_after(5):
            while len(clock.slept) < n:  # noqa: ASYNC110 - the sleeps come from other tasks, on no event of ours
                await anyio.sleep(0.005)

    try:
        async with anyio.create_task_group() as tg:
            await shared.acquire(10, 0)  # the whole burst (600 rpm, 1 s: 10 requests)
            for _ in range(3):
                tg.start_soon(shared.acquire, 1, 0)  # each sleeps on a reservation held in Redis
            await sleeping(3)
            assert sorted(clock.slept) == pytest.approx([0.1, 0.2, 0.3], abs=0.02)
            await anyio.to_thread.run_sync(redis_server.kill)
            # to the local share (300 rpm: 0.2 s a request, 5 of burst): it starts empty and owes the three
            # reservations still waiting in Redis, so a newcomer waits 3 · 0.2 + 0.2 s (not 0: a full burst)
            tg.start_soon(shared.acquire, 1, 0)
            await sleeping(4)
            assert shared.fallbacks == 1
            assert clock.slept[-1] == pytest.approx(0.8)
            # back to Redis, restarted empty (a full burst on offer): the first call drains the shared bucket and
            # charges it with the newcomer still waiting in the local share, then waits 0.1 + 0.1 s
            await anyio.to_thread.run_sync(redis_server.restart)
            clock.advance(5.0)
            tg.start_soon(shared.acquire, 1, 0)
            await sleeping(5)
            assert shared.fallbacks == 1
            assert clock.slept[-1] == pytest.approx(0.2, abs=0.02)  # on Redis TIME
            clock.gate.set()
        assert shared.last_error is None
    finally:
        await backend.aclose()


async def test_fail_closed_raises_fast_and_recovers(redis_server: RedisServer) -> None:
    timeout = 0.2
    backend = RedisBackend(redis_server.url, timeout=timeout, on_unavailable="fail_closed")
    try:
        clock = ManualClock()
        shared = limiter(backend, unique_name(), clock=clock)
        await shared.run(ok, CallContext(clock=clock))
        await anyio.to_thread.run_sync(redis_server.kill)
        start = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await shared.run(ok, CallContext(clock=clock))
        assert time.monotonic() - start < timeout + 0.5  # bounded by the backend timeout, not redis-py's retries
        with pytest.raises(BackendUnavailable, match="not trying it again yet"):
            await shared.acquire(1, 0)  # within backend_retry_after: no attempt at all
        assert (shared.unavailable, shared.fallbacks) == (1, 0)
        await anyio.to_thread.run_sync(redis_server.restart)
        clock.advance(1.0)
        assert await shared.run(ok, CallContext(clock=clock)) == "ok"
    finally:
        await backend.aclose()


async def test_a_hung_redis_costs_one_timeout_then_falls_back(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url, timeout=0.2)
    try:
        shared = limiter(backend, unique_name(), clock=ManualClock())
        await shared.acquire(1, 0)
        redis_server.pause()
        try:
            start = time.monotonic()
            for _ in range(5):
                await shared.acquire(1, 0)
            assert time.monotonic() - start < 0.2 + 0.5  # one timeout, not five
            assert (shared.fallbacks, shared.unavailable) == (5, 1)
        finally:
            redis_server.resume()
    finally:
        await backend.aclose()


async def test_lease_mode_falls_back_too(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url, timeout=0.2)
    try:
        shared = limiter(backend, unique_name(), clock=ManualClock(), lease=3)
        await shared.acquire(1, 0)
        await anyio.to_thread.run_sync(redis_server.kill)
        await shared.acquire(1, 0)
        await shared.acquire(1, 0)  # the lease is still spent locally
        await shared.acquire(1, 0)  # a new lease fails: the local share admits
        assert (shared.leases, shared.lease_admissions, shared.fallbacks) == (1, 2, 1)
    finally:
        await backend.aclose()
