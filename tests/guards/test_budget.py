"""RetryBudget: retries add at most ``ratio`` × recent requests + a floor (Finagle RetryBudget, Envoy budgets)."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragguard import CallContext, ConfigError, ManualClock, Outcome, Retry, RetryExhausted, RetryPolicy
from ragguard.guards.budget import RetryBudget, RetryBudgetExhausted

# ---------------------------------------------------------------- helpers


class Upstream:
    """A provider that counts every attempt sent to it and fails the ones ``fails(n)`` says (n from 1)."""

    def __init__(self, fail_every: int = 1) -> None:
        self.fail_every = fail_every  # 1: every attempt fails; 0: none does
        self.attempts = 0
        self.errors: list[ConnectionError] = []

    async def __call__(self) -> str:
        self.attempts += 1
        if self.fail_every and self.attempts % self.fail_every == 0:
            exc = ConnectionError(f"upstream down (attempt {self.attempts})")
            self.errors.append(exc)
            raise exc
        return "ok"


async def burst(retry: Retry, upstream: Upstream, clock: ManualClock, n: int) -> list[BaseException | str]:
    """``n`` concurrent logical calls through ``retry``; each one's result or error."""
    results: list[BaseException | str] = []

    async def one() -> None:
        try:
            results.append(await retry.run(upstream, CallContext(clock=clock)))
        except RetryExhausted as exc:
            results.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return results


# ---------------------------------------------------------------- the storm is capped


@pytest.mark.anyio
async def test_total_outage_sends_at_most_1_plus_ratio_times_the_load_plus_the_floor() -> None:
    n, ratio, per_s, window = 200, 0.2, 1.0, 10.0
    floor = per_s * window
    clock = ManualClock()
    # tiny backoff so the whole burst stays within one window: the bound is then exact
    budget = RetryBudget(ratio, per_s, window, clock=clock)
    retry = Retry(attempts=4, base=0.001, cap=0.001, jitter="none", clock=clock, budget=budget)
    upstream = Upstream(fail_every=1)

    results = await burst(retry, upstream, clock, n)

    assert clock.now() < window  # the scenario is what it claims to be
    assert len(results) == n
    assert all(isinstance(r, RetryExhausted) for r in results)
    bound = n * (1 + ratio) + floor  # 250, against 4 × 200 = 800 without a budget
    assert upstream.attempts <= bound
    # the budget is spent, not merely refused: every retry it could grant was granted
    assert upstream.attempts == math.floor(bound)
    stats = budget.stats()
    assert (stats.requests, stats.retries) == (n, upstream.attempts - n)
    assert stats.refused == sum(isinstance(r, RetryBudgetExhausted) for r in results) > 0
    assert stats.available == 0

    # the same burst without a budget multiplies the load by `attempts`
    unbudgeted = Upstream(fail_every=1)
    await burst(Retry(attempts=4, base=0.001, cap=0.001, jitter="none", clock=clock), unbudgeted, clock, n)
    assert unbudgeted.attempts == 4 * n


@pytest.mark.anyio
async def test_a_long_outage_stays_within_the_budget_in_every_window() -> None:
    # 60 s of 100 % failures at 20 calls/s, sequential: each window of the budget must hold the bound.
    # A power-of-two backoff keeps the virtual clock exact, so every second starts exactly on a bucket.
    clock = ManualClock()
    budget = RetryBudget(0.2, 0.5, 10.0, buckets=10, clock=clock)
    retry = Retry(attempts=5, base=2.0**-10, cap=2.0**-10, jitter="none", clock=clock, budget=budget)
    upstream = Upstream(fail_every=1)
    per_second: list[tuple[int, int]] = []  # (calls, attempts) per second of the run
    for _second in range(60):
        start_attempts, start = upstream.attempts, clock.now()
        for _ in range(20):
            with pytest.raises(RetryExhausted):
                await retry.run(upstream, CallContext(clock=clock))
        clock.advance(1.0 - (clock.now() - start))
        per_second.append((20, upstream.attempts - start_attempts))
    for end in range(1, 61):  # every 10 s window aligned on the budget's buckets
        calls = sum(c for c, _ in per_second[max(0, end - 10) : end])
        sent = sum(a for _, a in per_second[max(0, end - 10) : end])
        assert sent - calls <= 0.2 * calls + 0.5 * 10.0 + 1e-9
    # six disjoint windows: at most (1 + ratio) × the offered load + the floor × 60 s (without: 5 × 1200)
    assert upstream.attempts <= 1200 * 1.2 + 0.5 * 60
    assert budget.stats().refused > 0


# ---------------------------------------------------------------- healthy traffic is never refused


@pytest.mark.anyio
async def test_no_failures_nothing_refused() -> None:
    clock = ManualClock()
    budget = RetryBudget(0.2, 0.0, 10.0, clock=clock)
    retry = Retry(attempts=4, clock=clock, budget=budget)
    upstream = Upstream(fail_every=0)
    results = await burst(retry, upstream, clock, 50)
    assert results == ["ok"] * 50
    assert budget.stats() == (50, 0, 0, 50, 0, 10)


@pytest.mark.anyio
async def test_failures_below_the_ratio_are_all_retried() -> None:
    # every 10th attempt fails once (≈ 10 % retries < 20 %), no floor: every call still succeeds
    clock = ManualClock()
    budget = RetryBudget(0.2, 0.0, 10.0, clock=clock)
    retry = Retry(attempts=2, base=0.001, cap=0.001, jitter="none", clock=clock, budget=budget)
    upstream = Upstream(fail_every=10)
    for _ in range(100):
        assert await retry.run(upstream, CallContext(clock=clock)) == "ok"
    stats = budget.stats()
    assert stats.refused == 0
    assert stats.retries == len(upstream.errors) > 0


# ---------------------------------------------------------------- refusal fails fast, with the error chained


@pytest.mark.anyio
async def test_refusal_fails_fast_without_sleeping_and_chains_the_provider_error() -> None:
    clock = ManualClock(start=100.0)
    budget = RetryBudget(0.0, 0.0, 10.0, clock=clock)  # no retry is ever allowed
    retry = Retry(attempts=5, base=1.0, cap=10.0, clock=clock, budget=budget)
    upstream = Upstream(fail_every=1)
    with pytest.raises(RetryExhausted) as info:
        await retry.run(upstream, CallContext(clock=clock))
    exc = info.value
    assert isinstance(exc, RetryBudgetExhausted)
    assert exc.reason == "retry_budget"
    assert "retry budget exhausted" in str(exc)
    assert exc.attempts == 1
    assert exc.last_error is upstream.errors[0]
    assert exc.__cause__ is upstream.errors[0]
    assert upstream.attempts == 1
    assert clock.slept == []
    assert clock.now() == 100.0
    assert budget.stats().refused == 1


@pytest.mark.anyio
async def test_only_real_retries_spend_the_budget() -> None:
    clock = ManualClock()
    budget = RetryBudget(0.0, 0.2, 10.0, clock=clock)  # floor: 2 retries per window
    retry = Retry(attempts=2, base=0.001, cap=0.001, jitter="none", clock=clock, budget=budget)

    async def bad_request() -> str:
        raise ValueError("400")  # not retryable: no retry asked for

    def not_retryable(exc: BaseException) -> Outcome:
        return Outcome("client", retryable=False, failure=True)

    ctx = CallContext(clock=clock, classify=not_retryable)
    with pytest.raises(ValueError, match="400"):
        await retry.run(bad_request, ctx)
    # attempts run out: the last failure is not a retry either
    with pytest.raises(RetryExhausted) as info:
        await retry.run(Upstream(fail_every=1), CallContext(clock=clock))
    assert not isinstance(info.value, RetryBudgetExhausted)
    stats = budget.stats()
    assert (stats.requests, stats.retries, stats.refused) == (2, 1, 0)


@pytest.mark.anyio
async def test_from_policy_takes_the_budget() -> None:
    clock = ManualClock()
    budget = RetryBudget(0.0, 0.0, 1.0, clock=clock)
    retry = Retry.from_policy(RetryPolicy(attempts=3), clock=clock, budget=budget)
    with pytest.raises(RetryBudgetExhausted):
        await retry.call(Upstream(fail_every=1))


def test_disabled_retry_does_not_touch_the_budget() -> None:
    budget = RetryBudget(clock=ManualClock())
    retry = Retry(enabled=False, budget=budget)
    assert anyio.run(retry.call, Upstream(fail_every=0)) == "ok"
    assert budget.stats().requests == 0


# ---------------------------------------------------------------- the window slides


def test_old_traffic_stops_counting() -> None:
    clock = ManualClock()
    budget = RetryBudget(0.5, 0.0, 10.0, buckets=10, clock=clock)  # 1 s buckets
    budget.deposit(10)
    assert [budget.try_acquire_retry() for _ in range(6)] == [True] * 5 + [False]
    clock.advance(5.0)
    budget.deposit(10)  # 20 requests in the window: 10 retries, 5 spent
    assert [budget.try_acquire_retry() for _ in range(6)] == [True] * 5 + [False]
    clock.advance(5.0)  # t = 10: the t = 0 bucket (10 requests, 5 retries) leaves the window
    stats = budget.stats()
    assert (stats.window_requests, stats.window_retries, stats.available) == (10, 5, 0)
    assert not budget.try_acquire_retry()
    clock.advance(5.0)  # t = 15: everything expired
    assert budget.stats()[3:] == (0, 0, 0)
    assert not budget.try_acquire_retry()
    budget.deposit(2)
    assert [budget.try_acquire_retry() for _ in range(2)] == [True, False]
    stats = budget.stats()
    assert (stats.requests, stats.retries, stats.refused) == (22, 11, 5)


def test_the_floor_refills_with_time() -> None:
    clock = ManualClock()
    budget = RetryBudget(0.0, 0.5, 4.0, buckets=4, clock=clock)  # 2 retries per 4 s with no traffic
    assert [budget.try_acquire_retry() for _ in range(3)] == [True, True, False]
    clock.advance(3.0)
    assert not budget.try_acquire_retry()
    clock.advance(1.0)
    assert budget.try_acquire_retry()
    clock.advance(1e6)  # a jump far past the window
    assert budget.stats().available == 2


def test_invalid_arguments() -> None:
    for kwargs in (
        {"ratio": -0.1},
        {"ratio": math.nan},
        {"ratio": 11.0},
        {"min_retries_per_s": -1.0},
        {"min_retries_per_s": math.inf},
        {"window_s": 0.0},
        {"window_s": math.inf},
        {"buckets": 0},
        {"buckets": True},
    ):
        with pytest.raises(ConfigError):
            RetryBudget(**kwargs)
    with pytest.raises(ConfigError, match="budget"):
        Retry(budget=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="requests"):
        RetryBudget().deposit(-1)


def test_threads_share_one_budget_consistently() -> None:
    clock = ManualClock()
    budget = RetryBudget(0.25, 0.0, 10.0, clock=clock)
    granted = [0] * 4

    def work(i: int) -> None:
        for _ in range(2000):
            budget.deposit()
            granted[i] += budget.try_acquire_retry()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = budget.stats()
    assert stats.requests == 8000
    assert stats.retries == sum(granted) == 2000  # exactly 25 % of 8000: none lost, none extra
    assert stats.refused == 8000 - 2000


# ---------------------------------------------------------------- property: the bound holds in every window


@dataclass
class Model:
    """A naive reference: every event kept with its time; windows counted by scanning."""

    width: float
    buckets: int
    ratio: float
    floor: float
    requests: list[float] = field(default_factory=list)
    retries: list[float] = field(default_factory=list)

    def bucket_window(self, now: float) -> tuple[int, int]:
        first = math.floor(now / self.width) - (self.buckets - 1)
        return (
            sum(1 for t in self.requests if math.floor(t / self.width) >= first),
            sum(1 for t in self.retries if math.floor(t / self.width) >= first),
        )


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("deposit"), st.integers(min_value=1, max_value=5)),
        st.tuples(st.just("retry"), st.just(0)),
        st.tuples(st.just("advance"), st.integers(min_value=0, max_value=40)),  # × 1/8 s
    ),
    max_size=150,
)


@settings(max_examples=200, deadline=None)
@given(
    ops=OPS,
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0, 3.0]),
    per_s=st.sampled_from([0.0, 0.125, 0.5, 1.0]),
    window=st.sampled_from([1.0, 2.0, 4.0, 8.0]),
    buckets=st.sampled_from([1, 2, 4, 8]),
)
def test_retries_never_exceed_ratio_times_requests_plus_floor(
    ops: list[tuple[str, int]], ratio: float, per_s: float, window: float, buckets: int
) -> None:
    # times on a 1/8 s grid and power-of-two bucket widths: every time is exact in binary floating point
    clock = ManualClock()
    budget = RetryBudget(ratio, per_s, window, buckets=buckets, clock=clock)
    width, floor = window / buckets, per_s * window
    model = Model(width, buckets, ratio, floor)
    for op, arg in ops:
        now = clock.now()
        if op == "advance":
            clock.advance(arg / 8.0)
        elif op == "deposit":
            budget.deposit(arg)
            model.requests.extend([now] * arg)
        else:
            reqs, rets = model.bucket_window(now)
            expected = rets + 1 <= ratio * reqs + floor + 1e-9
            assert budget.try_acquire_retry() is expected  # the same decision as the naive reference
            if expected:
                model.retries.append(now)
                # any time window one bucket shorter than window_s and ending now holds at most
                # ratio × (requests of the window_s ending now) + floor retries
                recent = sum(1 for t in model.retries if t >= now - (window - width))
                offered = sum(1 for t in model.requests if t > now - window)
                assert recent <= ratio * offered + floor + 1e-9
        # (once time moves on, requests may expire before the retries they paid for: the bound is checked at grants)
        stats = budget.stats()
        reqs, rets = model.bucket_window(clock.now())
        assert (stats.window_requests, stats.window_retries) == (reqs, rets)
        assert stats.retries == len(model.retries)
        assert stats.requests == len(model.requests)
