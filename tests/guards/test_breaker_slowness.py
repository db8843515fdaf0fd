"""Size-aware slow calls in the circuit breaker: latency per output token for completions, time to first token for
streams, raw latency only when no size is known (resilience4j's slow-call rate; resilience4j#1477).

Unit tests drive :class:`CircuitBreaker` with a :class:`ManualClock` and calls that fill the context as the
provider layer does; the end-to-end tests use the real ``openai`` SDK against two simulators, a fast one
answering long completions and a slow one answering short ones in about the same time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import anyio
import pydantic
import pytest
from openai import AsyncOpenAI

import ragguard
from ragguard import BreakerPolicy, BreakerState, CallContext, CircuitBreaker, CircuitOpenError, ManualClock
from ragguard.guards.breaker import is_slow_call
from ragguard.guards.shared_breaker import SharedCircuitBreaker
from ragguard.testing import OpenAISimulator, Served, SimulatorConfig, serve

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

#: 20 ms per output token (50 tokens/s) after a 0.5 s allowance for the first one; 5 s when the size is unknown
SIZE_AWARE = {"slow_call_s_per_token": 0.02, "slow_first_token_s": 0.5, "slow_call_s": 5.0}


class HTTPError(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


def completion(
    ctx: CallContext, *, seconds: float, tokens: float | None = None, first_token: float | None = None
) -> Any:
    """A call that reports what the provider layer would: how long the attempt took and what it produced."""

    async def call() -> str:
        ctx.attempt_s = seconds
        ctx.output_tokens = tokens
        ctx.first_token_s = first_token
        return "answer"

    return call


async def record(breaker: CircuitBreaker, clock: ManualClock, **kwargs: Any) -> None:
    ctx = CallContext(clock=clock)
    await breaker.run(completion(ctx, **kwargs), ctx)


# ---------------------------------------------------------------- the rule


def test_a_long_completion_with_many_tokens_is_not_slow_a_short_one_as_long_is() -> None:
    # 20 s for 1,500 tokens is 13 ms per token: a normal long answer (allowed: 0.5 + 1,500 · 0.02 = 30.5 s)
    assert not is_slow_call(20.0, output_tokens=1_500, **SIZE_AWARE)
    # 20 s for 12 tokens (allowed: 0.74 s): the provider is crawling
    assert is_slow_call(20.0, output_tokens=12, **SIZE_AWARE)
    # the raw threshold alone (5 s) would have called both slow
    assert is_slow_call(20.0, slow_call_s=5.0)


def test_a_streams_first_token_is_judged_on_its_own() -> None:
    # a stream of unknown total length: only its first chunk's time counts
    assert not is_slow_call(0.4, first_token_s=0.4, **SIZE_AWARE)
    assert is_slow_call(0.8, first_token_s=0.8, **SIZE_AWARE)
    # without a first-token threshold, the raw one applies to it
    assert is_slow_call(6.0, first_token_s=6.0, slow_call_s=5.0)
    assert not is_slow_call(4.0, first_token_s=4.0, slow_call_s=5.0)


def test_raw_latency_when_no_size_is_known() -> None:
    assert is_slow_call(5.5, **SIZE_AWARE)  # an embeddings call, a search: no output tokens
    assert not is_slow_call(4.5, **SIZE_AWARE)
    assert not is_slow_call(1e6)  # no rule at all: nothing is slow
    # a known size without a per-token rule falls back to the raw one
    assert is_slow_call(6.0, output_tokens=10_000, slow_call_s=5.0)


def test_zero_output_tokens_count_as_one() -> None:
    assert not is_slow_call(0.515, output_tokens=0, **SIZE_AWARE)
    assert is_slow_call(0.525, output_tokens=0, **SIZE_AWARE)


# ---------------------------------------------------------------- the breaker


@pytest.mark.anyio
async def test_long_completions_keep_the_breaker_closed_short_slow_ones_open_it() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("chat", window=10, min_calls=5, slow_call_rate=0.6, clock=clock, **SIZE_AWARE)
    for _ in range(20):
        await record(breaker, clock, seconds=20.0, tokens=1_500)
    assert breaker.state is CLOSED
    assert breaker.snapshot().slow_calls == 0
    for _ in range(5):
        await record(breaker, clock, seconds=20.0, tokens=12)
    snapshot = breaker.snapshot()
    assert (snapshot.slow_calls, snapshot.slow_call_rate) == (5, 0.5)
    assert snapshot.state is CLOSED  # 50 % slow < 60 %
    await record(breaker, clock, seconds=20.0, tokens=12)
    assert breaker.state is OPEN
    with pytest.raises(CircuitOpenError):
        await record(breaker, clock, seconds=0.1, tokens=10)


@pytest.mark.anyio
async def test_slow_streams_open_the_breaker_by_their_first_token() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("stream", window=4, min_calls=4, slow_call_rate=1.0, clock=clock, **SIZE_AWARE)
    for _ in range(8):
        await record(breaker, clock, seconds=0.2, first_token=0.2)
    assert breaker.state is CLOSED
    for _ in range(4):
        await record(breaker, clock, seconds=2.0, first_token=2.0)
    assert breaker.state is OPEN


@pytest.mark.anyio
async def test_without_an_attempt_time_the_breaker_times_the_call_itself() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("search", window=2, min_calls=2, slow_call_s=1.0, clock=clock)

    async def search(seconds: float) -> str:
        clock.advance(seconds)
        return "hits"

    await breaker.call(search, 0.5)
    await breaker.call(search, 2.0)
    assert (breaker.state, breaker.snapshot().slow_calls) == (CLOSED, 1)
    await breaker.call(search, 3.0)
    assert breaker.state is OPEN


@pytest.mark.anyio
async def test_the_attempts_own_time_wins_over_waits_around_it() -> None:
    """Time spent waiting for a rate-limit permit or a bulkhead slot (outside the attempt) is not slowness."""
    clock = ManualClock()
    breaker = CircuitBreaker("chat", window=2, min_calls=2, slow_call_s=1.0, clock=clock)
    for _ in range(4):
        ctx = CallContext(clock=clock)

        async def queued_then_fast(ctx: CallContext = ctx) -> str:
            clock.advance(30.0)  # queued behind a rate limit
            ctx.attempt_s = 0.3  # the provider call itself
            return "answer"

        await breaker.run(queued_then_fast, ctx)
    assert (breaker.state, breaker.snapshot().slow_calls) == (CLOSED, 0)


@pytest.mark.anyio
async def test_slow_failures_count_as_slow_too() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(
        "chat", window=4, min_calls=4, failure_rate=1.0, failure_threshold=100, slow_call_s=1.0, clock=clock
    )

    async def slow_500() -> None:
        clock.advance(2.0)
        raise HTTPError(500)

    async def fast_400() -> None:
        raise HTTPError(400)  # a success for the breaker, and fast

    for fail in (slow_500, fast_400, slow_500, fast_400):
        with pytest.raises(HTTPError):
            await breaker.call(fail)
    snapshot = breaker.snapshot()
    assert (snapshot.failures, snapshot.slow_calls, snapshot.state) == (2, 2, CLOSED)


@pytest.mark.anyio
async def test_a_slow_probe_reopens_the_breaker() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("chat", window=2, min_calls=2, open_duration=10.0, clock=clock, **SIZE_AWARE)
    for _ in range(2):
        await record(breaker, clock, seconds=9.0, tokens=5)
    assert breaker.state is OPEN
    clock.advance(10.0)
    await record(breaker, clock, seconds=9.0, tokens=5)  # the probe answers, slowly
    assert breaker.state is OPEN
    clock.advance(10.0)
    await record(breaker, clock, seconds=1.0, tokens=500)  # a normal probe closes it
    assert breaker.state is CLOSED


@pytest.mark.anyio
async def test_permits_can_report_slowness() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("chat", window=2, min_calls=2, slow_call_s=1.0, clock=clock)
    breaker.acquire().record_success(slow=True)
    breaker.acquire().record_failure(slow=False)
    snapshot = breaker.snapshot()
    assert (snapshot.calls, snapshot.failures, snapshot.slow_calls) == (2, 1, 1)


@pytest.mark.anyio
async def test_without_slow_call_settings_the_breaker_reads_no_clock_per_call() -> None:
    class CountingClock(ManualClock):
        reads = 0

        def now(self) -> float:
            self.reads += 1
            return super().now()

    clock = CountingClock()
    breaker = CircuitBreaker("chat", clock=clock)
    for _ in range(5):
        await record(breaker, clock, seconds=100.0, tokens=1)
    assert clock.reads == 0
    assert breaker.snapshot().slow_calls == 0


@pytest.mark.parametrize(
    ("settings", "field_name"),
    [
        ({"slow_call_s": 0}, "slow_call_s"),
        ({"slow_call_s_per_token": -1}, "slow_call_s_per_token"),
        ({"slow_first_token_s": float("inf")}, "slow_first_token_s"),
        ({"slow_call_rate": 0}, "slow_call_rate"),
        ({"slow_call_rate": 1.5}, "slow_call_rate"),
    ],
)
def test_invalid_slow_call_settings_name_the_field(settings: dict[str, Any], field_name: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=field_name):
        BreakerPolicy(**settings)
    with pytest.raises(pydantic.ValidationError, match=field_name):
        CircuitBreaker("x", **settings)


def test_a_shared_breaker_accepts_a_policy_with_slow_call_settings() -> None:
    """The shared (Redis) breaker keeps the settings but does not apply them yet; it must still build."""
    policy = BreakerPolicy(slow_call_s=2.0, slow_call_s_per_token=0.01, slow_first_token_s=1.0, slow_call_rate=0.5)
    store = SimpleNamespace(on_unavailable="fail_open")  # construction never talks to the store
    shared = SharedCircuitBreaker.from_policy(policy, store=store, name="chat")  # type: ignore[arg-type]
    assert shared.policy == policy
    assert CircuitBreaker.from_policy(policy).policy == policy


# ---------------------------------------------------------------- end to end, through the openai SDK


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the SDK's async client is asyncio-first


@pytest.fixture
def sims() -> Iterator[tuple[Served[OpenAISimulator], Served[OpenAISimulator]]]:
    quick = SimulatorConfig(rpm=None, tpm=None, base_latency_s=0.02, per_token_latency_s=0.001, jitter=0.0)
    sluggish = SimulatorConfig(rpm=None, tpm=None, base_latency_s=0.8, per_token_latency_s=0.0, jitter=0.0)
    with serve(OpenAISimulator(quick)) as fast, serve(OpenAISimulator(sluggish)) as slow:
        yield fast, slow


def guarded(served: Served[OpenAISimulator], breaker: dict[str, Any]) -> tuple[AsyncOpenAI, ragguard.MemoryBackend]:
    backend = ragguard.MemoryBackend()
    policy = ragguard.Policy(
        breaker={"window": 8, "min_calls": 4, "slow_call_rate": 0.75, "open_duration": 60.0, **breaker},
        retry={"attempts": 1},
        cache={"enabled": False},
        coalesce={"enabled": False},
    )
    return ragguard.guard(
        AsyncOpenAI(base_url=served.base_url, api_key="sk-test-0123"), policy, backend=backend
    ), backend


def breaker_of(backend: ragguard.MemoryBackend) -> CircuitBreaker:
    (breaker,) = [b for _, b in backend.items("breaker") if isinstance(b, CircuitBreaker)]
    return breaker


LONG = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Tell me everything"}], "n": 16}
SHORT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Yes or no?"}], "max_tokens": 2}
#: per output token 5 ms after 0.4 s for the first: ≈ 0.5 s for 474 tokens is fine, 0.8 s for 2 tokens is not. The
#: first-token allowance is 20x the fast simulator's 0.02 s so that a loaded CI machine's scheduling delay does not
#: turn a fast stream's first chunk slow.
PER_TOKEN = {"slow_call_s_per_token": 0.005, "slow_first_token_s": 0.4}


async def concurrently(n: int, fn: Any) -> None:
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(fn)


@pytest.mark.anyio
async def test_end_to_end_long_completions_are_not_slow(sims: Any) -> None:
    fast, _ = sims
    client, backend = guarded(fast, PER_TOKEN)
    started = time.monotonic()
    await concurrently(6, lambda: client.chat.completions.create(**LONG))
    assert time.monotonic() - started > 0.4  # they really took long
    snapshot = breaker_of(backend).snapshot()
    assert (snapshot.state, snapshot.calls, snapshot.slow_calls) == (CLOSED, 6, 0)
    await client.close()
    # the same calls under a raw 0.3 s threshold would all be slow and open the breaker
    raw, raw_backend = guarded(fast, {"slow_call_s": 0.3})
    await concurrently(6, lambda: raw.chat.completions.create(**LONG))
    assert breaker_of(raw_backend).state is OPEN
    await raw.close()


@pytest.mark.anyio
async def test_end_to_end_short_slow_completions_open_the_breaker(sims: Any) -> None:
    _, slow = sims
    client, backend = guarded(slow, PER_TOKEN)
    await concurrently(4, lambda: client.chat.completions.create(**SHORT))
    breaker = breaker_of(backend)
    assert (breaker.state, breaker.snapshot().slow_calls) == (OPEN, 4)
    with pytest.raises(CircuitOpenError):
        await client.chat.completions.create(**SHORT)
    await client.close()


@pytest.mark.anyio
async def test_end_to_end_streams_are_judged_by_their_first_chunk(sims: Any) -> None:
    fast, slow = sims

    async def consume(client: AsyncOpenAI) -> None:
        stream = await client.chat.completions.create(**LONG, stream=True)
        async for _ in stream:
            pass

    client, backend = guarded(fast, PER_TOKEN)  # first chunk after ≈ 0.02 s, the whole stream ≈ 0.5 s
    await concurrently(4, lambda: consume(client))
    assert (breaker_of(backend).state, breaker_of(backend).snapshot().slow_calls) == (CLOSED, 0)
    await client.close()
    client, backend = guarded(slow, PER_TOKEN)  # first chunk after 0.8 s
    await concurrently(4, lambda: consume(client))
    assert breaker_of(backend).state is OPEN
    await client.close()
