"""Hedge: after a delay, a second attempt races the first; the first success wins, the other is cancelled."""

from __future__ import annotations

import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from openai import AsyncOpenAI
from pinecone import Pinecone
from pydantic import ValidationError

import ragguard
from ragguard import CallContext, CircuitBreaker, CircuitOpenError, ConfigError, ManualClock, Pipeline, Retry, Timeout
from ragguard.config import HedgePolicy
from ragguard.guards.budget import RetryBudget, SharedRetryBudget
from ragguard.guards.fallback import Fallback
from ragguard.guards.hedge import Hedge
from ragguard.providers.generic import build_pipeline
from ragguard.providers.pinecone import guard_pinecone
from ragguard.testing import OpenAISimulator, SimulatorConfig, serve


class StatusError(Exception):
    """An SDK-like error carrying an HTTP status."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


class Attempts:
    """The attempts of one hedged call: attempt ``i`` (from 0) runs ``behaviours[i]``; records what happened."""

    def __init__(self, *behaviours: Any) -> None:
        self.behaviours = behaviours
        self.started: list[float] = []
        self.cancelled: list[int] = []
        self.begun = [anyio.Event() for _ in behaviours]

    async def __call__(self) -> Any:
        index = len(self.started)
        self.started.append(anyio.current_time())
        self.begun[index].set()
        try:
            return await self.behaviours[index]()
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(index)
            raise


async def forever() -> str:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


def returns(value: str) -> Any:
    async def behaviour() -> str:
        return value

    return behaviour


def raises(exc: Exception) -> Any:
    async def behaviour() -> str:
        raise exc

    return behaviour


def taking(clock: ManualClock, seconds: float) -> Any:
    """An attempt that takes ``seconds`` of virtual time and succeeds."""

    async def attempt() -> str:
        clock.advance(seconds)
        return "ok"

    return attempt


def budget(clock: Any = None, **kw: Any) -> RetryBudget:
    return RetryBudget(clock=clock or ManualClock(), **kw)


# ---------------------------------------------------------------- the race


@pytest.mark.anyio
async def test_the_hedge_is_sent_after_the_delay_the_first_success_wins_and_the_loser_is_cancelled() -> None:
    clock = ManualClock()
    spend = budget(clock)
    hedge = Hedge(delay=0.05, percentile=None, budget=spend, clock=clock)
    attempts = Attempts(forever, returns("hedge"))

    assert await hedge.run(attempts, CallContext(clock=clock)) == "hedge"

    assert clock.slept == [0.05]  # the hedge waited exactly the delay
    assert len(attempts.started) == 2
    assert attempts.cancelled == [0]  # the stalled first attempt was cancelled, and the cancellation stayed inside
    stats = hedge.stats()
    assert (stats.calls, stats.hedges, stats.wins, stats.refused) == (1, 1, 1, 0)
    assert spend.stats().retries == 1  # the hedge was paid for from the budget
    assert spend.stats().requests == 1  # and the call deposited once


@pytest.mark.anyio
async def test_in_real_time_the_hedge_starts_no_sooner_than_the_delay() -> None:
    hedge = Hedge(delay=0.05, percentile=None)
    attempts = Attempts(forever, returns("hedge"))

    called_at = anyio.current_time()
    assert await hedge.call(attempts) == "hedge"

    assert attempts.started[1] - called_at >= 0.05
    assert attempts.cancelled == [0]


@pytest.mark.anyio
async def test_no_hedge_when_the_first_attempt_answers_before_the_delay() -> None:
    spend = budget()
    hedge = Hedge(delay=5.0, percentile=None, budget=spend)
    attempts = Attempts(returns("first"))

    assert await hedge.call(attempts) == "first"  # returns at once: the 5 s wait for a hedge is cancelled

    assert len(attempts.started) == 1
    assert hedge.stats().hedges == 0
    assert spend.stats().retries == 0


@pytest.mark.anyio
async def test_no_hedge_when_the_budget_refuses() -> None:
    clock = ManualClock()
    spend = budget(clock, ratio=0.0, min_retries_per_s=0.0)  # grants nothing

    async def slow() -> str:
        await anyio.sleep(0.2)  # real time: far longer than the virtual delay takes to pass
        return "first"

    hedge = Hedge(delay=0.05, percentile=None, budget=spend, clock=clock)
    attempts = Attempts(slow)

    assert await hedge.run(attempts, CallContext(clock=clock)) == "first"

    assert len(attempts.started) == 1
    assert hedge.stats().refused == 1
    assert spend.stats().refused == 1


@pytest.mark.anyio
async def test_up_to_max_hedges_are_sent_delay_apart() -> None:
    clock = ManualClock()
    hedge = Hedge(delay=0.1, percentile=None, max_hedges=2, budget=budget(clock), clock=clock)
    attempts = Attempts(forever, forever, returns("third"))

    assert await hedge.run(attempts, CallContext(clock=clock)) == "third"

    assert clock.slept == [0.1, 0.1]
    assert sorted(attempts.cancelled) == [0, 1]
    assert hedge.stats().hedges == 2


# ---------------------------------------------------------------- failures


@pytest.mark.anyio
@pytest.mark.parametrize("error", [StatusError(400), ConnectionError("reset")], ids=["non-retryable", "retryable"])
async def test_a_fast_failure_is_returned_at_once_without_hedging(error: Exception) -> None:
    spend = budget()
    hedge = Hedge(delay=1.0, percentile=None, budget=spend)
    attempts = Attempts(raises(error))

    with pytest.raises(type(error)) as info:
        await hedge.call(attempts)

    assert info.value is error  # unchanged, so a Retry outside judges it as usual
    assert len(attempts.started) == 1
    assert spend.stats().retries == 0


@pytest.mark.anyio
async def test_a_non_retryable_error_of_a_hedge_ends_the_call_and_cancels_the_first_attempt() -> None:
    clock = ManualClock()
    hedge = Hedge(delay=0.05, percentile=None, budget=budget(clock), clock=clock)
    attempts = Attempts(forever, raises(StatusError(422)))

    with pytest.raises(StatusError):
        await hedge.run(attempts, CallContext(clock=clock))

    assert attempts.cancelled == [0]


@pytest.mark.anyio
async def test_a_retryable_failure_while_a_hedge_is_in_flight_waits_for_the_hedge() -> None:
    clock = ManualClock()
    hedge = Hedge(delay=0.05, percentile=None, budget=budget(clock), clock=clock)
    first_failed = anyio.Event()

    async def first() -> str:
        await attempts.begun[1].wait()
        first_failed.set()
        raise ConnectionError("reset")

    async def second() -> str:
        await first_failed.wait()
        return "hedge"

    attempts = Attempts(first, second)

    assert await hedge.run(attempts, CallContext(clock=clock)) == "hedge"
    assert hedge.stats().wins == 1


@pytest.mark.anyio
async def test_when_every_attempt_fails_the_error_that_reached_the_provider_is_raised() -> None:
    clock = ManualClock()
    hedge = Hedge(delay=0.05, percentile=None, budget=budget(clock), clock=clock)
    provider_error = ConnectionError("reset")

    async def first() -> str:
        await attempts.begun[1].wait()
        await anyio.lowlevel.checkpoint()  # let the hedge be refused first
        raise provider_error

    attempts = Attempts(first, raises(CircuitOpenError("x", 1.0, 1.0)))  # the hedge: refused by a breaker

    with pytest.raises(ConnectionError) as info:
        await hedge.run(attempts, CallContext(clock=clock))
    assert info.value is provider_error


@pytest.mark.anyio
async def test_a_loser_that_turns_its_cancellation_into_an_error_does_not_leak_it() -> None:
    clock = ManualClock()
    hedge = Hedge(delay=0.05, percentile=None, budget=budget(clock), clock=clock)

    async def sdk_like() -> str:
        try:
            await anyio.sleep_forever()
        finally:
            raise RuntimeError("connection closed while reading")  # what a careless SDK does
        return "unreachable"

    assert await hedge.run(Attempts(sdk_like, returns("hedge")), CallContext(clock=clock)) == "hedge"


@pytest.mark.anyio
async def test_cancellation_from_outside_cancels_every_attempt_and_propagates() -> None:
    hedge = Hedge(delay=0.01, percentile=None)
    attempts = Attempts(forever, forever)
    results: list[Any] = []

    async def caller() -> None:
        results.append(await hedge.call(attempts))

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        await attempts.begun[1].wait()
        tg.cancel_scope.cancel()

    assert tg.cancel_scope.cancelled_caught  # the cancellation reached the caller's scope unchanged
    assert results == []
    assert sorted(attempts.cancelled) == [0, 1]
    assert hedge.stats().wins == 0


class CountingStore:
    """A budget store in memory (the shape of the Redis one): one window, never expiring, for one test."""

    on_unavailable = "fail_closed"
    expected_instances = 1

    def __init__(self) -> None:
        self.requests = 0
        self.retries = 0
        self.acquires = 0

    def _reply(self, granted: bool = False) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(granted=granted, window_requests=self.requests, window_retries=self.retries)

    async def deposit(self, name: str, requests: int, *, window_s: float, buckets: int) -> Any:
        self.requests += requests
        return self._reply()

    async def acquire(
        self, name: str, *, deposit: int, ratio: float, floor: float, window_s: float, buckets: int
    ) -> Any:
        self.acquires += 1
        self.requests += deposit
        granted = self.retries + 1 <= ratio * self.requests + floor
        self.retries += granted
        return self._reply(granted)

    async def snapshot(self, name: str, *, window_s: float, buckets: int) -> Any:
        return self._reply()


@pytest.mark.anyio
async def test_a_budget_shared_through_a_store_grants_the_hedges_too() -> None:
    clock = ManualClock()
    store = CountingStore()
    shared = SharedRetryBudget("svc", store=store, ratio=0.0, min_retries_per_s=0.1, window_s=10.0, clock=clock)
    hedge = Hedge(delay=0.05, percentile=None, budget=shared, clock=clock)

    assert await hedge.run(Attempts(forever, returns("hedge")), CallContext(clock=clock)) == "hedge"

    # the floor allows one retry per window: the second call's hedge is refused by the store
    async def slow() -> str:
        await anyio.sleep(0.2)  # real time: far longer than the virtual delay takes to pass
        return "ok"

    assert await hedge.run(Attempts(slow), CallContext(clock=clock)) == "ok"

    assert store.acquires == 2
    assert (hedge.stats().hedges, hedge.stats().refused) == (1, 1)
    assert store.requests == 2  # each call deposited once (the hedge deposits: no Retry shares this budget)


# ---------------------------------------------------------------- the delay


@pytest.mark.anyio
async def test_the_percentile_delay_follows_recent_latencies() -> None:
    clock = ManualClock()
    hedge = Hedge(delay=None, percentile=90.0, window=20, min_samples=10, budget=budget(clock), clock=clock)

    async def call_taking(seconds: float) -> None:
        await hedge.run(taking(clock, seconds), CallContext(clock=clock))

    for _ in range(9):
        await call_taking(0.1)
    assert hedge.current_delay() is None  # warming up: no hedge yet (delay=None)
    await call_taking(0.1)
    assert hedge.current_delay() == pytest.approx(0.1)

    for _ in range(10):
        await call_taking(0.1)
    for _ in range(2):
        await call_taking(1.0)
    # window: 18 × 0.1 s and 2 × 1.0 s; nearest-rank p90 is the 18th smallest
    assert hedge.current_delay() == pytest.approx(0.1)
    await call_taking(1.0)
    assert hedge.current_delay() == pytest.approx(1.0)  # 17 × 0.1 s and 3 × 1.0 s: the 18th is 1.0 s

    for _ in range(20):
        await call_taking(0.3)
    assert hedge.current_delay() == pytest.approx(0.3)  # the old latencies left the window
    assert hedge.stats().samples == 20


@pytest.mark.anyio
async def test_the_percentile_delay_is_clamped_and_a_fixed_delay_serves_until_warm() -> None:
    clock = ManualClock()
    hedge = Hedge(
        delay=0.5, percentile=50.0, window=5, min_samples=5, min_delay=0.2, max_delay=2.0, budget=budget(clock)
    )
    assert hedge.current_delay() == 0.5
    for seconds in (0.01, 0.01, 0.01, 9.0, 9.0):
        await hedge.run(taking(clock, seconds), CallContext(clock=clock))
    assert hedge.current_delay() == 0.2  # the median, 0.01 s, raised to min_delay
    for seconds in (9.0, 9.0, 9.0):
        await hedge.run(taking(clock, seconds), CallContext(clock=clock))
    assert hedge.current_delay() == 2.0  # the median, 9 s, capped at max_delay


@pytest.mark.anyio
async def test_a_first_attempt_cut_short_by_a_hedge_counts_as_at_least_the_time_it_ran() -> None:
    hedge = Hedge(delay=0.05, percentile=90.0, window=10, min_samples=1)

    assert await hedge.call(Attempts(forever, returns("hedge"))) == "hedge"

    assert hedge.stats().samples == 1  # the cancelled first attempt's running time
    delay = hedge.current_delay()
    assert delay is not None
    # the censored sample (about the delay: the first attempt ran from just after the call began until the
    # hedge won) keeps the tail in the window; half the delay leaves room for a busy machine's scheduling
    assert delay > 0.025


# ---------------------------------------------------------------- configuration and composition


def test_hedging_is_off_by_default_and_validated() -> None:
    assert ragguard.Policy().hedge.enabled is False
    with pytest.raises(ValidationError, match="percentile"):
        HedgePolicy(delay=None, percentile=None)
    with pytest.raises(ValidationError, match="min_samples"):
        HedgePolicy(window=10, min_samples=11)
    with pytest.raises(ValidationError, match="max_delay"):
        HedgePolicy(min_delay=1.0, max_delay=0.5)
    with pytest.raises(ValidationError, match="percentile"):
        Hedge(percentile=100.0)
    with pytest.raises(ConfigError):
        Hedge(budget="plenty")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_disabled_hedge_is_a_pass_through() -> None:
    hedge = Hedge(enabled=False, delay=0.0, percentile=None)
    attempts = Attempts(returns("only"))
    assert await hedge.call(attempts) == "only"
    assert hedge.stats().calls == 0


def test_in_a_pipeline_the_hedge_sits_between_the_retry_and_the_breaker() -> None:
    pipeline = Pipeline(Timeout(1.0), CircuitBreaker("x"), Hedge(delay=1.0), Retry(), Fallback("static"))
    assert [type(g).__name__ for g in pipeline.guards] == ["Fallback", "Retry", "Hedge", "CircuitBreaker", "Timeout"]


def _standard(policy: ragguard.Policy, backend: ragguard.MemoryBackend, *, hedge: bool) -> Pipeline:
    return build_pipeline(policy, backend, breaker="svc:read", bucket="svc", bulkhead="svc", hedge=hedge)


@pytest.mark.anyio
async def test_build_pipeline_hedges_only_when_asked_and_enabled_and_shares_the_retry_budget() -> None:
    on = ragguard.Policy(hedge={"enabled": True, "delay": 1.0, "percentile": None})
    backend = ragguard.MemoryBackend()

    assert not any(isinstance(g, Hedge) for g in _standard(on, backend, hedge=False).guards)
    assert not any(isinstance(g, Hedge) for g in _standard(ragguard.Policy(), backend, hedge=True).guards)

    pipeline = _standard(on, backend, hedge=True)
    [hedge] = [g for g in pipeline.guards if isinstance(g, Hedge)]
    assert [type(g).__name__ for g in pipeline.guards][1:3] == ["Retry", "Hedge"]
    # one per breaker name, spending the Retry's own budget
    assert [g for g in _standard(on, backend, hedge=True).guards if isinstance(g, Hedge)] == [hedge]
    shared = backend.get_or_create("retry_budget", f"svc:read:{on.retry_budget.model_dump_json()}", RetryBudget)
    assert hedge.budget is shared

    async def read() -> str:
        return "ok"

    assert await pipeline.call(read) == "ok"
    assert shared.stats().requests == 1  # the Retry deposited the call; the hedge did not count it again

    # without a retry, the hedge deposits into a budget of its own section's settings
    no_retry = ragguard.Policy(hedge={"enabled": True, "delay": 1.0, "percentile": None}, retry={"enabled": False})
    lone = _standard(no_retry, ragguard.MemoryBackend(), hedge=True)
    [lone_hedge] = [g for g in lone.guards if isinstance(g, Hedge)]
    assert await lone.call(read) == "ok"
    assert isinstance(lone_hedge.budget, RetryBudget)
    assert lone_hedge.budget.stats().requests == 1


# ---------------------------------------------------------------- through the real SDKs

STALL_S = 1.5
#: seed 16 stalls the 9th and 12th requests (0-based 8 and 11) of a run at stall_rate 0.25: the hedged run of
#: 11 calls meets both (its hedges shift the sequence), the unhedged one meets the first
SEED = 16
CALLS = 11


def _hedged_policy(enabled: bool) -> ragguard.Policy:
    return ragguard.Policy(
        hedge={"enabled": enabled, "delay": 0.1, "percentile": None},
        timeout={"attempt": 10.0, "total": 30.0},
        cache={"enabled": False},
        coalesce={"enabled": False},
    )


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the SDK's async client is asyncio-first
async def test_a_hedged_openai_client_finishes_every_call_well_before_a_stall(anyio_backend: str) -> None:
    config = SimulatorConfig.instant(rpm=None, tpm=None, stall_rate=0.25, stall_s=STALL_S, seed=SEED)
    with serve(OpenAISimulator(config)) as served:
        durations: dict[bool, list[float]] = {}
        for enabled in (True, False):
            served.reset()
            raw = AsyncOpenAI(base_url=served.base_url, api_key="sk-test-hedge")
            client = ragguard.guard(raw, _hedged_policy(enabled), backend=ragguard.MemoryBackend())
            try:
                took = durations[enabled] = []
                for i in range(CALLS):
                    started = time.monotonic()
                    response = await client.embeddings.create(model="text-embedding-3-small", input=f"text {i}")
                    took.append(time.monotonic() - started)
                    assert len(response.data[0].embedding) == 1536
                core: Any = client.ragguard  # type: ignore[attr-defined]
                guards = core.pipeline("embeddings", "text-embedding-3-small").guards
                hedges = [g for g in guards if isinstance(g, Hedge)]
                if enabled:
                    assert served.stats().faults.get("stall", 0) == 2  # the stalls happened
                    assert hedges[0].stats().wins == 2  # and hedges answered instead
                    chat = core.pipeline("chat.completions", "gpt-4o-mini").guards
                    assert not any(isinstance(g, Hedge) for g in chat)  # chat is never hedged
                else:
                    assert hedges == []
            finally:
                await client.close()
    assert max(durations[True]) < STALL_S / 2
    assert max(durations[False]) >= STALL_S - 0.05  # the unhedged client waited the stall out


def test_a_pinecone_index_hedges_queries_and_fetches_only() -> None:
    policy = ragguard.Policy(hedge={"enabled": True, "delay": 0.2, "percentile": None})
    index = guard_pinecone(
        Pinecone(api_key="pc-test").Index(host="http://127.0.0.1:9"), policy, backend=ragguard.MemoryBackend()
    )
    try:
        core: Any = index.ragguard
        hedged = {
            op
            for op in ("query", "fetch", "upsert", "delete")
            if any(isinstance(g, Hedge) for g in core.pipeline(op).guards)
        }
        assert hedged == {"query", "fetch"}
    finally:
        index.close()
