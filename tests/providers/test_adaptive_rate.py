"""The adaptive request rate of the local limiter: provider's advertised limit, AIMD on 429s, never above the quota.

End to end (real ``openai`` SDK, :class:`OpenAISimulator` over HTTP): with the quota configured three times too
high, a guarded client under sustained concurrent load keeps upstream 429s at or below 5 % of its requests and
never sends faster than the configured quota; with a provider more generous than the quota, the quota holds.
Measured before this limiter learnt the provider's rate (only ``x-ratelimit-remaining-*`` and shared pauses):
37 % of upstream requests were 429s and 37 of 400 calls failed in the first scenario (48 workers, 6,000 RPM).

The unit tests drive :class:`RateLimiter` alone on virtual time (they live here, beside the scenario they serve).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from openai import AsyncOpenAI

import ragguard
from ragguard import CallContext, ManualClock, RateLimiter
from ragguard._hints import RateLimitHeaders
from ragguard.guards.limiter import MIN_RATE_BACKOFF, RATE_BACKOFF, RATE_RECOVERY_PER_S
from ragguard.testing import OpenAISimulator, Served, SimulatorConfig, serve

KEY = "sk-test-0123456789abcdef"
#: the limiter's own tests run on both backends (the end-to-end ones on asyncio, the SDK's)
BOTH = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])


class HTTPError(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


class EventClock:
    """Virtual time shared by concurrent tasks: each sleeper wakes when the test moves time past its deadline."""

    def __init__(self) -> None:
        self._now = 0.0
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), event))
        await event.wait()

    async def run_all(self) -> None:
        await anyio.wait_all_tasks_blocked()
        while self._sleepers:
            when, _, event = heapq.heappop(self._sleepers)
            self._now = max(self._now, when)
            event.set()
            await anyio.wait_all_tasks_blocked()


def answered(ctx: CallContext, headers: RateLimitHeaders, status: int | None = None) -> Any:
    """An attempt whose response carried ``headers`` (as the provider layer notes them), failing with
    ``status`` if given."""

    async def call() -> str:
        ctx.rate_headers = headers
        if status is not None:
            raise HTTPError(status)
        return "ok"

    return call


async def run(limiter: RateLimiter, clock: Any, headers: RateLimitHeaders, status: int | None = None) -> None:
    ctx = CallContext(clock=clock)
    if status is None:
        await limiter.run(answered(ctx, headers), ctx)
    else:
        with pytest.raises(HTTPError):
            await limiter.run(answered(ctx, headers, status), ctx)


# ---------------------------------------------------------------- the advertised limit


@pytest.mark.anyio
@BOTH
async def test_the_rate_is_capped_to_the_providers_advertised_limit_never_raised_above_the_quota() -> None:
    clock = ManualClock()
    limiter = RateLimiter(rpm=600, tpm=60_000, clock=clock)
    assert (limiter.effective_rpm, limiter.provider_rpm) == (600, None)
    await run(limiter, clock, RateLimitHeaders(limit_requests=200, limit_tokens=30_000))
    assert (limiter.effective_rpm, limiter.provider_rpm) == pytest.approx((200, 200))
    assert (limiter.effective_tpm, limiter.provider_tpm) == pytest.approx((30_000, 30_000))
    assert limiter.rpm == 600  # the configured quota is unchanged
    await run(limiter, clock, RateLimitHeaders(limit_requests=5_000, limit_tokens=10**9))
    assert (limiter.effective_rpm, limiter.effective_tpm) == pytest.approx((600, 60_000))


@pytest.mark.anyio
@BOTH
async def test_no_learning_across_models_or_with_follow_headers_off() -> None:
    clock = ManualClock()
    # a credential-wide pool spans models with different limits: it adopts none, but still backs off on a 429
    pooled = RateLimiter(rpm=600, scope="credential", clock=clock, share_retry_after=False)
    await run(pooled, clock, RateLimitHeaders(limit_requests=100))
    assert (pooled.effective_rpm, pooled.provider_rpm) == (600, None)
    await run(pooled, clock, RateLimitHeaders(limit_requests=100), status=429)
    assert pooled.effective_rpm == pytest.approx(600 * RATE_BACKOFF)
    off = RateLimiter(rpm=600, follow_headers=False, clock=clock, share_retry_after=False)
    await run(off, clock, RateLimitHeaders(limit_requests=100))
    await run(off, clock, RateLimitHeaders(limit_requests=100), status=429)
    assert (off.effective_rpm, off.provider_rpm, off.backoff) == (600, None, 1.0)
    unlimited = RateLimiter(tpm=6_000, clock=clock)  # no request quota: an advertised one is not adopted
    await run(unlimited, clock, RateLimitHeaders(limit_requests=100))
    assert unlimited.effective_rpm is None


@pytest.mark.anyio
@BOTH
async def test_waiting_callers_move_to_the_learnt_pace_and_the_early_burst_becomes_debt() -> None:
    clock = EventClock()
    limiter = RateLimiter(rpm=600, burst_seconds=1.0, clock=clock)  # 10/s, capacity 10: configured too high
    admitted: list[float] = []

    async def caller() -> None:
        await limiter.acquire()
        admitted.append(clock.now())

    async with anyio.create_task_group() as tg:
        for _ in range(15):
            tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        assert len(admitted) == 10  # the configured burst went at once; five wait for 0.1 … 0.5 s
        limiter.observe(RateLimitHeaders(limit_requests=300))  # the provider allows 5/s, capacity 5
        await clock.run_all()
    # as if 5/s had applied from the start: 5 at once, then one per 0.2 s (the 11th … 15th at 1.2 … 2.0 s)
    assert admitted[10:] == pytest.approx([1.2, 1.4, 1.6, 1.8, 2.0])
    assert limiter.reserve() == pytest.approx(0.2)  # and the next one after them


@pytest.mark.anyio
@BOTH
async def test_an_idle_limiter_learning_a_lower_limit_owes_nothing() -> None:
    clock = ManualClock()
    limiter = RateLimiter(rpm=600, burst_seconds=1.0, clock=clock)
    await limiter.acquire()
    clock.advance(100.0)
    limiter.observe(RateLimitHeaders(limit_requests=300))
    assert limiter.available_requests == pytest.approx(5)  # full, at the smaller capacity


# ---------------------------------------------------------------- AIMD on 429s


@pytest.mark.anyio
@BOTH
async def test_a_429_with_rate_headers_backs_the_rate_off_once_per_round() -> None:
    clock = EventClock()
    limiter = RateLimiter(rpm=6_000, clock=clock, share_retry_after=False)
    headers = RateLimitHeaders(limit_requests=6_000)
    gates = [anyio.Event() for _ in range(3)]

    async def attempt(i: int) -> None:
        ctx = CallContext(clock=clock)

        async def call() -> None:
            await gates[i].wait()
            ctx.rate_headers = headers
            raise HTTPError(429)

        with pytest.raises(HTTPError):
            await limiter.run(call, ctx)

    async with anyio.create_task_group() as tg:
        tg.start_soon(attempt, 0)
        tg.start_soon(attempt, 1)
        await anyio.wait_all_tasks_blocked()
        gates[0].set()  # two calls of one round answered 429: one decrease
        gates[1].set()
    assert limiter.backoff == pytest.approx(RATE_BACKOFF)
    assert limiter.effective_rpm == pytest.approx(6_000 * RATE_BACKOFF)
    async with anyio.create_task_group() as tg:
        tg.start_soon(attempt, 2)  # admitted after the decrease: a new round
        await anyio.wait_all_tasks_blocked()
        gates[2].set()
    assert limiter.backoff == pytest.approx(RATE_BACKOFF**2)


@pytest.mark.anyio
@BOTH
async def test_the_backoff_recovers_slowly_on_successes_and_has_a_floor() -> None:
    clock = ManualClock()
    limiter = RateLimiter(rpm=600, clock=clock, share_retry_after=False)
    headers = RateLimitHeaders(limit_requests=600)
    for _ in range(30):
        await run(limiter, clock, headers, status=429)
    assert limiter.backoff == MIN_RATE_BACKOFF
    assert limiter.effective_rpm == pytest.approx(600 * MIN_RATE_BACKOFF)
    clock.advance(10.0)
    await run(limiter, clock, headers)
    assert limiter.backoff == pytest.approx(MIN_RATE_BACKOFF + 10 * RATE_RECOVERY_PER_S)
    clock.advance(1_000.0)
    await run(limiter, clock, headers)
    assert (limiter.backoff, limiter.effective_rpm) == (1.0, pytest.approx(600))  # never above the quota


@pytest.mark.anyio
@BOTH
async def test_a_bare_429_pauses_but_does_not_move_the_rate() -> None:
    clock = ManualClock()
    limiter = RateLimiter(rpm=600, clock=clock)

    async def bare() -> None:
        raise HTTPError(429)

    with pytest.raises(HTTPError):
        await limiter.run(bare, CallContext(clock=clock))
    assert limiter.paused_until > 0.0
    assert (limiter.backoff, limiter.effective_rpm) == (1.0, 600)


# ---------------------------------------------------------------- end to end


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the SDK's async client is asyncio-first; the limiter itself is tested on trio too


@pytest.fixture
def sim() -> Iterator[Served[OpenAISimulator]]:
    # 6,000 RPM with a one-second burst (100 requests); answers take 10 ms
    config = SimulatorConfig(rpm=6_000, tpm=10**9, base_latency_s=0.01, per_token_latency_s=0.0)
    with serve(OpenAISimulator(config)) as served:
        yield served


CHAT = {"model": "gpt-4o-mini", "max_tokens": 8}


async def load(client: AsyncOpenAI, calls: int, workers: int) -> list[BaseException]:
    """``calls`` chat completions by ``workers`` concurrent users, each asking again as soon as answered."""
    errors: list[BaseException] = []
    numbers = iter(range(calls))

    async def user() -> None:
        for i in numbers:
            try:
                await client.chat.completions.create(messages=[{"role": "user", "content": f"question {i}"}], **CHAT)
            except Exception as exc:
                errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(user)
    return errors


def limiter_of(backend: ragguard.MemoryBackend) -> RateLimiter:
    (limiter,) = [lim for _, lim in backend.items("rate_limit") if isinstance(lim, RateLimiter)]
    return limiter


@pytest.mark.anyio
async def test_a_quota_three_times_too_high_converges_to_the_providers_rate(sim: Served[OpenAISimulator]) -> None:
    backend = ragguard.MemoryBackend()
    policy = ragguard.Policy(rate_limit={"rpm": 3 * 6_000})
    client = ragguard.guard(AsyncOpenAI(base_url=sim.base_url, api_key=KEY), policy, backend=backend)
    started = anyio.current_time()
    errors = await load(client, calls=300, workers=48)
    elapsed = anyio.current_time() - started
    await client.close()
    stats = sim.stats()
    assert errors == []
    assert stats.rate_limited_total <= 0.05 * stats.requests_total, stats
    limiter = limiter_of(backend)
    assert limiter.provider_rpm == 6_000
    assert limiter.effective_rpm is not None
    assert limiter.effective_rpm <= 6_000
    # and never above the configured quota: its burst plus its rate over the run
    assert stats.requests_total <= limiter.capacity_requests + 18_000 / 60 * elapsed


@pytest.mark.anyio
async def test_a_generous_provider_never_lifts_the_configured_quota() -> None:
    config = SimulatorConfig(rpm=60_000, tpm=10**9, base_latency_s=0.005, per_token_latency_s=0.0)
    with serve(OpenAISimulator(config)) as served:
        backend = ragguard.MemoryBackend()
        policy = ragguard.Policy(rate_limit={"rpm": 3_000, "burst_seconds": 0.2})  # 50/s, burst 10
        client = ragguard.guard(AsyncOpenAI(base_url=served.base_url, api_key=KEY), policy, backend=backend)
        errors = await load(client, calls=80, workers=20)
        await client.close()
        stats = served.stats()
    assert errors == []
    limiter = limiter_of(backend)
    assert (limiter.provider_rpm, limiter.effective_rpm) == (60_000, 3_000)
    assert stats.first_request_at is not None
    assert stats.last_request_at is not None
    span = stats.last_request_at - stats.first_request_at
    # admissions: at most the burst (10) plus 50/s; 0.1 s of slack for the client's send jitter at the ends
    # (the provider's own 1,000/s would have let all 80 through in a tenth of that time)
    assert stats.requests_total <= 10 + 50 * (span + 0.1)
    assert stats.requests_total == 80
